"""Resolve a model once: find its ViT and family, check that it can be explained, and keep what every explanation of
it needs (the attention layers and token plan per image size, the read-out, the logits, the state switches).

[`resolve_model`][gmar_lightning.resolve.resolve_model] does every model check in one pass;
[`explain`][gmar_lightning.engine.explain] takes its [`ResolvedModel`][gmar_lightning.resolve.ResolvedModel] (or
builds one for a raw module), and the callback builds one per fit and reuses it for every evaluation. No Lightning here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gmar_lightning import families
from gmar_lightning._checks import check_logits
from gmar_lightning.capture import unwrap_model
from gmar_lightning.families import Family, Probe, UnsupportedModelError, find_vision_transformer
from gmar_lightning.model_state import eval_mode_without_fast_paths, isolated
from gmar_lightning.naflex import NaFlexBatch, NaFlexFormat, call_model
from gmar_lightning.readout import UNDECIDED, checked_readout
from gmar_lightning.tokens import TokenLayout

__all__ = ["ResolvedModel", "as_resolved", "resolve_model", "structure_signature"]


def structure_signature(module: nn.Module) -> tuple:
    """What a resolution depends on: every submodule's class and every parameter's and buffer's name and shape.

    Removing heads ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]) replaces projections with smaller
    ones and adds ``kept_heads`` buffers, so it changes the signature; training steps do not.
    """
    modules = tuple(type(child) for child in module.modules())
    tensors = tuple(
        (name, tuple(tensor.shape))
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
    )
    return modules, tensors


def _output_tensors(output: object) -> list[Tensor]:
    """The tensors of a module's output: the tensor itself, or a transformers output's fields."""
    if isinstance(output, Tensor):
        return [output]
    fields = output.to_tuple() if hasattr(output, "to_tuple") else ()
    return [item for item in fields if isinstance(item, Tensor)]


@dataclass
class _Cache:
    """What a `ResolvedModel` learns as it is used: a probe per image size, and the read-out check's verdict."""

    probes: dict[tuple[int, int], Probe] = field(default_factory=dict)
    readout_checked: bool = False
    readout: TokenLayout | None = None  # None: the family's own


@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """A model as the engine explains it, resolved once by [`resolve_model`][gmar_lightning.resolve.resolve_model].

    Pass it to [`explain`][gmar_lightning.engine.explain] in place of the model to skip the model checks, and the
    read-out check's extra pass (docs/method.md), on every call after the first.

    Args:
        classifier: The module whose forward maps images to logits ``[B, C]``.
        vit: The ViT inside ``classifier`` whose attention is explained (``classifier`` itself when it classifies).
        family: The registered family that maps the ViT's attention onto tokens.
        token_layout: The read-out the user stated, or ``None`` (the family's, checked against the gradient).
        signature: The ViT's [`structure_signature`][gmar_lightning.resolve.structure_signature] at resolution.
    """

    classifier: nn.Module
    vit: nn.Module
    family: Family
    token_layout: TokenLayout | None
    signature: tuple = field(repr=False)
    _cache: _Cache = field(default_factory=_Cache, repr=False)

    @property
    def features_only(self) -> bool:
        """Whether the ViT has no classifier of its own (its outputs are features, the classifier adds the head)."""
        return self.family.headless(self.vit) is not None

    def is_current(self) -> bool:
        """Whether the ViT still has the structure it was resolved with (no heads removed, no layer replaced)."""
        return structure_signature(self.vit) == self.signature

    @property
    def naflex(self) -> NaFlexFormat | None:
        """How the ViT takes NaFlex batches, or ``None`` when it does not."""
        return self.family.naflex(self.vit)

    def probe(self, images: Tensor | NaFlexBatch, size: tuple[int, int] | None = None) -> Probe:
        """The attention layers and token plan for images of this size (or ``size``), built once per size.

        The first call checks the read-out against the gradient (docs/method.md) on ``images[:1]`` (a NaFlex batch:
        its first image with one padding slot), when the classifier puts its own head on the ViT's tokens and no
        ``token_layout`` was given.
        """
        if size is None:
            size = (int(images.shape[-2]), int(images.shape[-1]))
        probe = self._cache.probes.get(size)
        if probe is None:
            probe = families.probe(self.vit, size, self.readout(images), self.family)
            if self.token_layout is not None or self._cache.readout_checked:  # else checked again on the next call
                self._cache.probes[size] = probe
        return probe

    def readout(self, images: Tensor | NaFlexBatch) -> TokenLayout | None:
        """The token layout to explain with: the user's, else the one the gradient shows when the family's disagrees
        (``None``: the family's own, which the gradient confirms or which has no linear read-out to check)."""
        if self.token_layout is not None:
            return self.token_layout
        if self._cache.readout_checked:
            return self._cache.readout
        verdict = None
        family, vit = self.family, self.vit
        if self.classifier is not vit and (family.linear_readout(vit) or family.attention_pool(vit) is not None):
            sample = images.alone_with_padding() if isinstance(images, NaFlexBatch) else images[:1]
            verdict = checked_readout(self, sample)
            if verdict is UNDECIDED:  # NaN logits, the ViT not run...: the engine's own checks report why
                return None
        self._cache.readout_checked, self._cache.readout = True, verdict
        return verdict

    def logits(self, inputs: Tensor | dict[str, Tensor]) -> Tensor:
        """The classifier's ``[B, C]`` logits for ``inputs`` (images, or a NaFlex batch's dict), from its output (a
        tensor, or a transformers output's ``.logits``).

        Raises:
            ValueError: The output is not ``[B, C]`` logits, or it is the ViT's own pooled features (a ViT without a
                classifier returned as they are).
        """
        features: list[Tensor] = []
        with contextlib.ExitStack() as stack:
            if self.vit is not self.classifier and self.features_only:
                handle = self.vit.register_forward_hook(lambda _m, _i, output: features.extend(_output_tensors(output)))
                stack.callback(handle.remove)
            output = call_model(self.classifier, inputs) if isinstance(inputs, dict) else self.classifier(inputs)
        batch = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
        logits = check_logits(self.classifier, output, batch)
        if any(logits is feature for feature in features):
            raise ValueError(
                f"`model` ({type(self.classifier).__name__}) returns the pooled features of its ViT, not class "
                "logits: the ViT has no classifier (num_classes=0 / num_labels=0); add a classifier head after it."
            )
        return logits

    @contextlib.contextmanager
    def switches(self, probe: Probe, needs_gradients: bool, keep_fused: bool = False) -> Iterator[None]:
        """Eval mode, unfused (eager) attention (unless ``keep_fused``, for recomputed attention), no gradient
        checkpointing and (with ``needs_gradients``) frozen parameters, for the block only: every flag is restored on
        exit, also after an error."""
        unfused = [] if keep_fused else probe.modules
        with probe.context(), eval_mode_without_fast_paths(self.classifier, unfused, needs_gradients):
            yield

    @contextlib.contextmanager
    def isolated(self, needs_gradients: bool) -> Iterator[torch.device]:
        """Gradients on (under no_grad/inference_mode too), autocast off, RNG restored; yields the ViT's device."""
        parameter = next(self.vit.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with isolated(device, needs_gradients):
            yield device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the ViT's parameters have (images are fed in it: autocast is off)."""
        parameter = next(self.vit.parameters(), None)
        return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32


def resolve_model(
    model: nn.Module, *, vit: nn.Module | None = None, token_layout: TokenLayout | None = None
) -> ResolvedModel:
    """Find the ViT inside ``model`` and its family, and check once that they can be explained.

    Args:
        model: The classifier: a module whose forward maps images to logits ``[B, C]`` and holds a ViT
            (``torch.compile``d models are resolved to their eager module).
        vit: The ViT inside ``model`` whose attention is explained. Default: the outermost ViT found in ``model``
            (with a warning that names them all if there are several).
        token_layout: The prefix tokens and read-out, stated instead of inferred (single-sequence ViTs only).

    Raises:
        TypeError: ``model``, ``vit`` or ``token_layout`` is not of the right kind.
        ValueError: The model cannot be explained at any image size (an unsupported family or pooling, a ViT without
            a classifier explained on its own, parameters on the meta device); each message is one line that names
            the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_model(model)
    if vit is not None and not isinstance(vit, nn.Module):
        raise TypeError(f"`vit` must be the torch.nn.Module of a ViT inside `model`, got {type(vit).__name__}.")
    if token_layout is not None and not isinstance(token_layout, TokenLayout):
        raise TypeError(f"`token_layout` must be a TokenLayout or None, got {type(token_layout).__name__}.")
    vit = find_vision_transformer(model) if vit is None else unwrap_model(vit)
    family = families.find_family(vit)  # a model without a token rollout is refused before its inputs are checked
    headless = family.headless(vit)
    if vit is model and headless is not None:
        raise ValueError(
            f"`model` ({type(model).__name__}) is {headless}: it outputs pooled features, not class "
            "logits; explain the module that adds your classifier head, or create the model with classes."
        )
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(
            f"`model` ({type(model).__name__}) has parameters on the meta device, which hold no weights; materialise "
            "and load them first (model.to_empty(device='cpu'), then load_state_dict)."
        )
    if token_layout is not None and not family.takes_token_layout:
        raise ValueError(
            f"`token_layout` applies to single-sequence ViTs; {type(vit).__name__} fixes its own prefix tokens and "
            "read-out (docs/method.md). Leave `token_layout` unset."
        )
    if token_layout is not None and vit is model and family.attention_pool(vit) is not None:
        raise ValueError(
            f"`token_layout` does not apply to `model` ({type(model).__name__}): it reads its tokens through its "
            "attention pool (global_pool='map'), whose attention is the read-out; leave `token_layout` unset."
        )
    if token_layout is None:  # a stated layout overrides the pooling the family would refuse
        family.check(vit)
    return ResolvedModel(model, vit, family, token_layout, structure_signature(vit))


def as_resolved(
    model: nn.Module | ResolvedModel, vit: nn.Module | None, token_layout: TokenLayout | None
) -> ResolvedModel:
    """``model`` resolved, or as it is when already a `ResolvedModel` that ``vit`` and ``token_layout`` agree with.

    Raises:
        ValueError: A `ResolvedModel` is given with another ``vit`` or ``token_layout`` than it was resolved with,
            or its ViT changed structure since (resolve it again).
    """
    if not isinstance(model, ResolvedModel):
        return resolve_model(model, vit=vit, token_layout=token_layout)
    if vit is not None and unwrap_model(vit) is not model.vit:
        raise ValueError("`vit` differs from the ViT `model` was resolved with; leave `vit` unset or resolve again.")
    if token_layout is not None and token_layout != model.token_layout:
        raise ValueError(
            "`token_layout` differs from the one `model` was resolved with; pass it to resolve_model instead."
        )
    if not model.is_current():
        raise UnsupportedModelError(
            f"`model`'s ViT ({type(model.vit).__name__}) changed structure (heads removed or layers replaced) since it "
            "was resolved; call resolve_model(...) again."
        )
    return model
