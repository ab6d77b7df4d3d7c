"""Model families: for each kind of model, its attention layers in forward order and how they mix tokens.

One registry serves timm, transformers and open_clip alike. A family is a small module of plain functions,
``matches(model)`` and ``probe(model, image_size, token_layout)`` (and, where the timm defaults do not fit, ``check``,
``headless``, ``num_channels``, ``linear_readout``, ``attention_pool``, ``attention_layers``, ``naflex``),
registered as one `Family` entry in `FAMILIES`. Its probe returns a `Probe`: the attention modules to capture,
grouped into rollout layers, and the `TokenPlan` that maps each layer onto its token space. Models that cannot be
explained are refused in one line by the functions in `REFUSALS` (each library's own:
`gmar_lightning.families.refused` for timm, `gmar_lightning.families.hf` for transformers). ``docs/method.md``
defines every mapping; ``docs/supported_models.md`` lists what works; ``docs/architecture.md`` says how to add a
family.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from gmar_lightning.capture import AttentionLayer, find_attention_layers, unwrap_model
from gmar_lightning.mixing import TokenPlan
from gmar_lightning.naflex import NaFlexFormat
from gmar_lightning.tokens import TokenLayout, patch_embedding

__all__ = [
    "FAMILIES",
    "REFUSALS",
    "Family",
    "Probe",
    "UnsupportedModelError",
    "find_family",
    "find_vision_transformer",
    "headless_reason",
    "probe",
    "refusal",
    "require_pooling",
    "vision_transformers",
]


class UnsupportedModelError(ValueError):
    """The model's attention has no token rollout (or gmar-lightning does not know how to map it)."""


@dataclass(frozen=True)
class Probe:
    """What the engine needs to explain one model at one image size.

    Args:
        layers: Per rollout layer, its attention modules (parallel branches of one block share a layer).
        layer_names: One name per rollout layer.
        plan: How the layers mix tokens, from the first token space to the read-out.
        context: Entered around the explanation's forward and backward passes (e.g. to switch an attention
            implementation), restored on exit.
    """

    layers: list[list[AttentionLayer]]
    layer_names: list[str]
    plan: TokenPlan
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)

    @property
    def modules(self) -> list[AttentionLayer]:
        """Every captured attention module, in forward order."""
        return [module for layer in self.layers for module in layer]


ProbeFunction = Callable[[nn.Module, tuple[int, int], TokenLayout | None], Probe]


def timm_headless(model: nn.Module) -> str | None:
    """Why a timm model outputs pooled features rather than class logits (``num_classes=0``), or ``None``."""
    return "a ViT without a classifier (num_classes=0)" if getattr(model, "num_classes", None) == 0 else None


def timm_num_channels(model: nn.Module) -> int | None:
    """The image channels a timm model takes: its patch embedding's (a hybrid's: its CNN stem's first convolution)."""
    patch_embed = patch_embedding(model)
    stem = getattr(patch_embed, "backbone", None)
    if stem is not None:  # a hybrid's patch embedding projects CNN features; the images enter the CNN
        first = next((m for m in stem.modules() if isinstance(m, nn.Conv2d)), None)
        return getattr(first, "in_channels", None)
    # NaFlexViT patchifies with a linear layer and says its channels itself.
    return getattr(getattr(patch_embed, "proj", None), "in_channels", getattr(patch_embed, "in_chans", None))


@dataclass(frozen=True)
class Family:
    """One model family: a predicate, the probe that describes its token mixing, and what differs from timm's ViTs.

    A new family (a library, an architecture) is one `Family` entry in `FAMILIES`; only ``name``, ``matches`` and
    ``probe`` are required, the rest default to what timm models do.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    probe: ProbeFunction
    check: Callable[[nn.Module], None] = lambda _model: None
    """Raises the family's refusals that do not depend on the image size (e.g. an unsupported pooling)."""
    takes_token_layout: bool = False
    """Whether ``explain(token_layout=...)`` applies: only single-sequence ViTs have a layout to state."""
    headless: Callable[[nn.Module], str | None] = timm_headless
    """Why the model outputs pooled features rather than class logits (it has no classifier), or ``None``."""
    num_channels: Callable[[nn.Module], int | None] = timm_num_channels
    """The number of image channels the model takes, or ``None`` when it does not say."""
    linear_readout: Callable[[nn.Module], bool] = lambda _model: False
    """Whether the classifier reads a linear pooling (a token set's mean) of the last block's tokens, so that the
    read-out can be checked against, and inferred from, the gradient that enters those tokens (docs/method.md).
    ``False`` where the family fixes its read-out itself (a Swin's stage mean) or it is not a token mean (attention
    pooling)."""
    attention_pool: Callable[[nn.Module], nn.Module | None] = lambda _model: None
    """The module through which the model reads its tokens by attention (timm ``global_pool='map'``), whose own
    attention the family's read-out is, or ``None``. A head of the user's own that bypasses it (reading the tokens
    themselves) gets the linear read-out check all the same."""
    attention_layers: Callable[[nn.Module], list[AttentionLayer]] = find_attention_layers
    """Every attention module in forward order, for the head tools (masking, importance, pruning)."""
    naflex: Callable[[nn.Module], NaFlexFormat | None] = lambda _model: None
    """How the model takes NaFlex batches (timm's NaFlexViT, transformers' SigLIP 2), or ``None`` when it does not."""


def _registry() -> tuple[list[Family], list[Callable[[nn.Module], str | None]]]:
    from gmar_lightning.families import cait, hf, hf_swin, open_clip, pit, pvt, refused, sam, swin, vit

    families = [
        Family("sam", sam.matches, sam.probe, sam.check),
        Family("pit", pit.matches, pit.probe, pit.check),
        Family("cait", cait.matches, cait.probe, cait.check),
        Family("swin", swin.matches, swin.probe, swin.check),
        Family("pvt", pvt.matches, pvt.probe, pvt.check),
        Family(
            "vit",
            vit.matches,
            vit.probe,
            vit.check,
            takes_token_layout=True,
            linear_readout=vit.linear_readout,
            attention_pool=vit.attention_pool,
            naflex=vit.naflex,
        ),
        Family(
            "open_clip",
            open_clip.matches,
            open_clip.probe,
            open_clip.check,
            takes_token_layout=True,
            headless=open_clip.headless,
            num_channels=open_clip.num_channels,
            linear_readout=lambda _model: True,
            attention_layers=open_clip.attention_layers,
        ),
        Family(
            "transformers_swin",
            hf_swin.matches,
            hf_swin.probe,
            headless=hf.headless,
            num_channels=hf.num_channels_of,
            attention_layers=hf.attention_layers,
        ),
        Family(
            "transformers",
            hf.matches,
            hf.probe,
            takes_token_layout=True,
            headless=hf.headless,
            num_channels=hf.num_channels_of,
            linear_readout=hf.linear_readout,
            attention_layers=hf.attention_layers,
            attention_pool=hf.attention_pool,
            naflex=hf.naflex,
        ),
    ]
    return families, [refused.refusal, hf.unsupported_reason]


def refusal(model: nn.Module) -> str | None:
    """Why ``model`` (or a module inside it) cannot be explained, from the first of `REFUSALS` that knows, or
    ``None``."""
    return next((reason for find in REFUSALS if (reason := find(model)) is not None), None)


def find_family(model: nn.Module) -> Family:
    """The family that explains ``model``.

    Raises:
        UnsupportedModelError: The model's attention has no token rollout; the message names the class and why.
        AttentionNotFoundError: The model has no recognisable attention at all.
    """
    reason = refusal(model)
    if reason is not None:
        raise UnsupportedModelError(f"`model` ({type(model).__name__}) cannot be explained: {reason}.")
    family = next((family for family in FAMILIES if family.matches(model)), None)
    if family is None:
        find_attention_layers(model)  # no attention at all: the capture's own error says so
        raise UnsupportedModelError(
            f"`model` ({type(model).__name__}) is not a model family gmar-lightning knows how to roll out; "
            "docs/supported_models.md lists the supported ones."
        )
    return family


def probe(
    model: nn.Module, image_size: tuple[int, int], token_layout: TokenLayout | None = None, family: Family | None = None
) -> Probe:
    """Describe ``model``'s attention layers and token mixing for images of ``image_size`` (height, width).

    ``family`` skips the look-up when the caller has already found it with
    [`find_family`][gmar_lightning.families.find_family].
    """
    family = family if family is not None else find_family(model)
    if token_layout is not None and not family.takes_token_layout:
        raise ValueError(
            f"`token_layout` applies to single-sequence ViTs; {type(model).__name__} fixes its own prefix tokens and "
            "read-out (docs/method.md). Leave `token_layout` unset."
        )
    return family.probe(model, image_size, token_layout)


def require_pooling(model: nn.Module, pool: object, allowed: tuple[str, ...]) -> None:
    """Refuse a classifier pooling without a linear read-out, naming the poolings that have one."""
    if pool not in allowed:
        raise UnsupportedModelError(
            f"`model` ({type(model).__name__}) pools with global_pool={pool!r}, which has no linear read-out for "
            f"rollout; create it with global_pool={' or '.join(map(repr, allowed))}."
        )


def _is_vision_transformer(module: nn.Module) -> bool:
    """A model a family explains (a timm ViT, a Swin, a supported transformers ViT) or refuses by its class (XCiT)."""
    from gmar_lightning.families.refused import MODEL_REASONS

    return type(module).__name__ in MODEL_REASONS or any(family.matches(module) for family in FAMILIES)


def vision_transformers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, model)`` of every outermost ViT inside ``module`` (``module`` itself first), in registration order.

    A ViT is a model a family explains (or refuses by its class); ViTs inside a ViT (a transformers classifier's
    backbone) are not listed separately.
    """
    module = unwrap_model(module)
    found: list[tuple[str, nn.Module]] = []
    for name, candidate in module.named_modules():
        if any(outer == "" or name == outer or name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if _is_vision_transformer(candidate):
            found.append((name, unwrap_model(candidate)))
    return found


def headless_reason(vit: nn.Module) -> str | None:
    """Why a ViT outputs pooled features rather than class logits (no classifier head), or ``None`` if it has one."""
    family = next((family for family in FAMILIES if family.matches(vit)), None)
    return (family.headless if family is not None else timm_headless)(vit)


def find_vision_transformer(module: nn.Module) -> nn.Module:
    """The outermost ViT inside ``module`` (a LightningModule, a backbone with a separate head, a model nested as
    ``self.backbone``, a ``torch.compile``'d attribute), or ``module`` itself when it holds none that a family
    recognises (the families then say why it cannot be explained).

    If the module holds several (a teacher and a student), the first is returned with a warning that names them all
    and says how to choose.

    Raises:
        UnsupportedModelError: If ``module`` is or holds a transformers model that is not a supported ViT.
    """
    found = vision_transformers(module)
    if not found:
        reason = refusal(module)
        if reason is not None:
            raise UnsupportedModelError(f"`model` ({type(module).__name__}) cannot be explained: {reason}.")
        return unwrap_model(module)
    from gmar_lightning.families import hf

    reason = hf.outer_reason(unwrap_model(module), found[0][1])
    if reason is not None:
        raise UnsupportedModelError(f"`model` ({type(module).__name__}) cannot be explained: {reason}.")
    if len(found) > 1:
        names = ", ".join(f"`{name}` ({type(vit).__name__})" for name, vit in found)
        warnings.warn(
            f"`model` ({type(module).__name__}) holds {len(found)} ViTs: {names}; explaining `{found[0][0]}`. "
            f"To choose, pass `vit=` to explain (e.g. vit=model.get_submodule({found[-1][0]!r})).",
            stacklevel=3,
        )
    return found[0][1]


# Last: the family modules import the helpers above.
FAMILIES, REFUSALS = _registry()
"""`FAMILIES`: families tried in order; the first that matches a model wins (specific families before the generic
ViT). `REFUSALS`: functions that say why a model (or a module inside it) cannot be explained, or return ``None``;
asked before any family, in order."""
