"""Loading the models ``gmar-lightning explain`` explains: timm models by name, local weights files, the settings and
input recipe a Lightning checkpoint stores, Hugging Face and open_clip models and their class logits.

Nothing here imports Lightning: a Lightning ``.ckpt`` is read as the plain dict it is (``torch.load`` with
``weights_only=True``), so ``gmar-lightning explain`` starts without importing Lightning.

[`create_vit`][gmar_lightning.model_loading.create_vit] builds a timm model by name with constructor overrides, and
[`load_weights`][gmar_lightning.model_loading.load_weights] fills it (or a transformers classifier) from a weights file.
[`load_hf_model`][gmar_lightning.model_loading.load_hf_model] loads a Hugging Face model from a ``save_pretrained``
folder (or hub id) for ``gmar-lightning explain --model hf:...``,
[`hf_classifier`][gmar_lightning.model_loading.hf_classifier] makes class logits from it (zero-shot for an image-text
model, a linear head for a backbone), and
[`hf_image_processor_settings`][gmar_lightning.model_loading.hf_image_processor_settings] reads its saved image
processor. ``transformers`` is imported only there (``pip install transformers``, or the ``hf`` extra of a clone);
[`load_open_clip`][gmar_lightning.model_loading.load_open_clip] does the same for open_clip's ``hf-hub:`` and
``local-dir:`` names (the ``open_clip`` extra).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
from timm.models import load_state_dict
from torch import Tensor, nn

from gmar_lightning._checks import check_positive_int, one_line, strip_ansi
from gmar_lightning.capture import KEPT_HEADS
from gmar_lightning.classifiers import (
    DEFAULT_PROMPT,
    hf_image_features,
    hf_zero_shot,
    open_clip_zero_shot,
    with_linear_head,
)
from gmar_lightning.families.hf import unsupported_reason
from gmar_lightning.heads.pruning import restore_pruning
from gmar_lightning.input_recipe import INPUT_RECIPE_KEY, InputRecipe

__all__ = [
    "HF_PREFIX",
    "OPEN_CLIP_PREFIXES",
    "checkpoint_input_recipe",
    "checkpoint_model_settings",
    "create_vit",
    "hf_classifier",
    "hf_image_processor_settings",
    "hf_naflex_processor",
    "load_hf_model",
    "load_open_clip",
    "load_weights",
    "open_clip_classifier",
]

_MODEL_SETTINGS = ("model_name", "num_classes", "img_size", "model_kwargs")
_WEIGHTS_FILE = (
    "a weights file PyTorch can read safely: a state_dict saved with torch.save (.pth, .pt, .bin), a .safetensors "
    "file or a Lightning .ckpt"
)


def create_vit(
    model_name: str,
    num_classes: int,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    strict: bool = False,
) -> nn.Module:
    """Create a timm model by name with constructor overrides, optionally loading weights.

    Args:
        model_name: Any name ``timm.is_model`` accepts, e.g. ``"vit_tiny_patch16_224"``.
        num_classes: Size of the classification head.
        img_size: Input side the model is built for; ``None`` keeps the model's default.
        pretrained: Download timm hub weights (needs internet access).
        checkpoint_path: A local weights file loaded after creation (see
            [`load_weights`][gmar_lightning.model_loading.load_weights]).
        model_kwargs: More constructor overrides, e.g. ``{"patch_size": 8, "depth": 4}``.
        strict: Passed to [`load_weights`][gmar_lightning.model_loading.load_weights]: ``False`` re-initialises tensors
            whose shape differs (a new head).

    Returns:
        The model, in training mode.

    Examples:
        >>> vit = create_vit("vit_tiny_patch16_224", 3, img_size=32, model_kwargs={"patch_size": 8, "depth": 2})
        >>> vit.patch_embed.img_size, len(vit.blocks), vit.num_classes
        ((32, 32), 2, 3)
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f"`model_name` {model_name!r} is not a timm model; list names with timm.list_models('vit*').")
    check_positive_int("num_classes", num_classes)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"`model_kwargs` must be a dict of constructor overrides, got {type(model_kwargs).__name__}.")
    overrides = dict(model_kwargs or {})
    if img_size is not None:
        overrides["img_size"] = img_size
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **overrides)
    except TypeError as error:
        raise ValueError(f"`model_kwargs` {overrides} do not fit timm model {model_name!r}: {error}") from None
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path, strict=strict)
    return model


def _checkpoint_filter(model: nn.Module) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None:
    """timm's per-family ``checkpoint_filter_fn``, which resamples position embeddings to the model's size."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_weights(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> list[str]:
    """Load a local weights file into a timm model or a Hugging Face transformers classifier.

    Accepts a plain ``state_dict`` (``.pth``/``.pt``/``.bin``/``.safetensors``), a dict holding it under
    ``"state_dict"`` or ``"model"`` (timm training checkpoints) and a Lightning checkpoint of
    [`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier] (keys prefixed ``model.``). The file is read with
    ``weights_only=True``, so it cannot run code. Position embeddings saved at another image size are resampled by
    timm's filter for the model's family.
    Weights of a model whose heads were removed ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]) carry
    their pruning spec, and the model is pruned the same way before loading.

    Args:
        model: The model to fill.
        path: The weights file.
        strict: Require every tensor to match in name and shape. With ``False`` tensors whose shape differs
            (typically a classification head for another number of classes) keep their fresh initialisation.

    Returns:
        The names of the tensors that were not loaded (always empty when ``strict``).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file does not fit the model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`checkpoint` {path!r} does not exist; pass a weights file (.pth, .ckpt, ...).")
    try:
        state_dict = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception:
        # The loaders' own messages (pickle opcodes, "retry with weights_only=False") mislead: say what is expected.
        raise ValueError(f"`checkpoint` {path!r} is not {_WEIGHTS_FILE}.") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(value, Tensor) for value in state_dict.values()):
        raise ValueError(f"`checkpoint` {path!r} holds a {type(state_dict).__name__}, not {_WEIGHTS_FILE}.")
    prefix = "model."
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    # Weights of a model whose heads were removed carry the spec (kept_heads buffers): prune the fresh model alike.
    try:
        restore_pruning(model, state_dict)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`checkpoint` {path!r} does not fit this model: {error}") from None
    expected = model.state_dict()
    # A spec no layer took would otherwise vanish into --partial-checkpoint or read as an unrelated stray tensor.
    lost_specs = [key for key in state_dict if key.endswith(f".{KEPT_HEADS}") and key not in expected]
    if lost_specs:
        raise ValueError(
            f"`checkpoint` {path!r} was pruned from a model with attention layers this one lacks ({lost_specs[:3]}); "
            "build the architecture the weights were pruned from (transformers ViTs pruned under transformers 5 "
            "need transformers >= 5)."
        )
    filter_fn = _checkpoint_filter(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    mismatched = [key for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if strict and (mismatched or missing or unexpected):
        if mismatched:
            problem = f"shapes differ for {mismatched[:3]}"
        elif missing:
            problem = f"lacks {missing[:3]}"
        else:
            problem = f"has tensors the model lacks, such as {unexpected[:3]}"
        raise ValueError(
            f"`checkpoint` {path!r} does not fit this model ({problem}); check --model, --num-classes, --img-size "
            "and the model kwargs, or pass --partial-checkpoint to load only the tensors that fit."
        )
    loadable = {key: value for key, value in state_dict.items() if key in expected and key not in mismatched}
    if not loadable:
        raise ValueError(f"`checkpoint` {path!r} shares no tensor with the model; is it for another architecture?")
    model.load_state_dict(loadable, strict=False)
    return sorted(set(missing) | set(mismatched))


def _lightning_checkpoint(path: str) -> dict[str, Any] | None:
    """A Lightning ``.ckpt`` file's dict, or ``None`` for other files."""
    if not path.endswith(".ckpt") or not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"`checkpoint` {path!r} is not {_WEIGHTS_FILE}.") from None
    return checkpoint if isinstance(checkpoint, dict) else None


def checkpoint_model_settings(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model settings stored in a Lightning checkpoint of
    [`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier], or ``None`` for other files.

    Returns:
        ``{"model_name", "num_classes", "img_size", "model_kwargs"}``, enough to rebuild the model for the weights.
    """
    checkpoint = _lightning_checkpoint(os.fspath(path)) or {}
    settings = checkpoint.get("hyper_parameters", {})
    if not all(key in settings for key in _MODEL_SETTINGS):
        return None
    return {key: settings[key] for key in _MODEL_SETTINGS}


def checkpoint_input_recipe(path: str | os.PathLike[str]) -> InputRecipe:
    """The [`InputRecipe`][gmar_lightning.input_recipe.InputRecipe] a Lightning checkpoint stores (written by
    [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] or
    [`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier]); an empty recipe for other files.

    Raises:
        ValueError: If the stored recipe is invalid.
    """
    path = os.fspath(path)
    stored = (_lightning_checkpoint(path) or {}).get(INPUT_RECIPE_KEY)
    if stored is None:
        return InputRecipe()
    try:
        return InputRecipe.from_dict(stored)
    except ValueError as error:
        raise ValueError(f"`checkpoint` {path!r} holds an invalid input recipe: {error}") from None


INSTALL_HF = 'pip install transformers (or pip install -e ".[hf]" in your gmar-lightning clone)'
"""How to get transformers while gmar-lightning is not on a package index: the extra needs a clone."""

HF_PREFIX = "hf:"
"""How ``--model`` names a Hugging Face image classifier: ``hf:<save_pretrained folder or hub id>``."""

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _transformers(source: str) -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model {HF_PREFIX}{source} needs transformers: {INSTALL_HF}.") from None
    return transformers


def _resolve_hf_source(source: str) -> str:
    """A local folder holding ``config.json`` (as a path string), or ``source`` itself as a hub id."""
    if not source:
        raise ValueError(f"--model {HF_PREFIX} names no model; pass {HF_PREFIX}<save_pretrained folder or hub id>.")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {HF_PREFIX}{source} holds no config.json; pass a folder written by save_pretrained."
            )
        return str(path)
    # A hub id is "name" or "owner/name"; anything else was meant as a local path.
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        raise ValueError(
            f"--model {HF_PREFIX}{source} does not exist; pass a folder written by save_pretrained or a hub id."
        )
    return source


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """transformers' load reports and progress bars off: a failed load must end in one line naming the fix."""
    hf_logging = transformers.utils.logging
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.CRITICAL)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def _saved_weight_names(folder: Path) -> list[str]:
    """The tensor names stored in a ``save_pretrained`` folder (safetensors only; empty if there are none)."""
    if (folder / "model.safetensors.index.json").is_file():
        return list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as weights:
            return list(weights.keys())
    return []


def _architecture(transformers: ModuleType, config: Any) -> type | None:
    """The transformers class that saved the folder (``config.architectures``), or ``None`` when the config does not
    name one transformers has (a config saved on its own)."""
    names = getattr(config, "architectures", None) or []
    found = getattr(transformers, names[0], None) if names else None
    return found if isinstance(found, type) else None


def _is_image_text(model: nn.Module) -> bool:
    """An image-text model (``CLIPModel``, ``SiglipModel``): text embeddings to compare, an image tower inside."""
    return hasattr(model, "get_text_features") and hasattr(model, "vision_model") and hasattr(model, "logit_scale")


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))


def _override(config: Any, overrides: Mapping[str, Any]) -> None:
    """Set ``overrides`` on ``config``; an image-text model's image settings (``image_size``, ``patch_size``) live in
    its ``vision_config``, where they are set."""
    vision = getattr(config, "vision_config", None) or config
    for key, value in overrides.items():
        target = vision if not hasattr(config, key) and hasattr(vision, key) else config
        setattr(target, key, value)


def load_hf_model(
    source: str, config_overrides: dict[str, Any] | None = None, load_saved_weights: bool = True
) -> nn.Module:
    """The transformers model saved in a ``save_pretrained`` folder (or under a hub id), as the class that saved it.

    The class is the one the config names (``architectures``): an image classifier, an image-text model
    (``CLIPModel``, ``SiglipModel``) or a vision backbone (``CLIPVisionModel``, ``DINOv3ViTModel``...), each loaded
    as itself, never as another class that would fill the weights it lacks at random
    (``AutoModelForImageClassification`` turns a whole ``CLIPModel`` folder into a ``CLIPForImageClassification`` with
    a random classifier); saved weights that lack a tensor of the model are refused too. A config saved on its own
    (no ``architectures``) builds ``AutoModelForImageClassification``'s class. Make class logits from a model that has
    none with [`hf_classifier`][gmar_lightning.model_loading.hf_classifier].

    Args:
        source: A local folder holding ``config.json`` (and weights), or a hub id such as
            ``"google/vit-base-patch16-224"`` (downloaded, so only where the hub is reachable).
        config_overrides: Config attributes to change, e.g. ``{"num_labels": 3, "image_size": 64}``.
        load_saved_weights: Load the folder's weights (``from_pretrained``); ``False`` builds the architecture from
            its config with fresh weights, for [`load_weights`][gmar_lightning.model_loading.load_weights] to fill.

    Returns:
        The model in eval mode, float32.

    Raises:
        ValueError: If transformers is missing, the source does not exist or cannot be loaded, its saved weights lack
            tensors of the model (they would be random), or the folder's weights are those of a pruned model
            (``from_pretrained`` cannot load them: save the unpruned model's config there and pass the pruned weights
            file to ``load_weights``).
    """
    transformers = _transformers(source)
    location = _resolve_hf_source(source)
    named = f"--model {HF_PREFIX}{source}"
    folder = Path(location) if Path(location).is_dir() else None
    if load_saved_weights and folder is not None:
        pruned = [name for name in _saved_weight_names(folder) if name.endswith(f".{KEPT_HEADS}")]
        if pruned:
            raise ValueError(
                f"{named} holds the weights of a pruned model ({pruned[0]}), which from_pretrained cannot load; "
                "save_pretrained the unpruned model there and pass torch.save(model.state_dict()) of the pruned one "
                "as --checkpoint FILE."
            )
        if not any((folder / name).is_file() for name in _WEIGHT_FILES):
            raise ValueError(
                f"{named} holds a config but no weights ({', '.join(_WEIGHT_FILES)}); pass --checkpoint FILE, or "
                "--random-weights to explain a randomly initialised network on purpose."
            )
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(location)
            _override(config, config_overrides or {})
            architecture = _architecture(transformers, config)
            info: dict[str, Any] = {}
            if load_saved_weights:
                loader = architecture or transformers.AutoModelForImageClassification
                model, info = loader.from_pretrained(location, config=config, output_loading_info=True)
            elif architecture is not None:
                model = architecture(config)
            else:
                model = transformers.AutoModelForImageClassification.from_config(config)
    except RuntimeError as error:
        if not config_overrides:
            raise ValueError(f"{named} cannot be loaded ({one_line(error)[:300]}).") from None
        # from_pretrained raises RuntimeError when saved tensors do not fit the changed config's shapes.
        raise ValueError(
            f"{named}: the saved weights do not fit the config changed by --num-classes, --img-size or --model-kwargs "
            f"({config_overrides}); drop those options, or pass --checkpoint FILE or --random-weights."
        ) from None
    except pickle.UnpicklingError as error:
        # torch's own message advises loading with weights_only=False "if you trust the source": never pass that on.
        blocked = re.search(r"GLOBAL (\S+)", strip_ansi(str(error)))
        what = f"pickled code ({blocked.group(1)})" if blocked else "pickled objects other than tensors"
        raise ValueError(
            f"{named} holds {what} in pytorch_model.bin, which was refused without running it; pass a folder whose "
            "weights are model.safetensors, or --checkpoint FILE with plain tensors."
        ) from None
    except OSError as error:
        # transformers' messages run over many lines (hub hints): keep the first 300 characters.
        raise ValueError(
            f"{named} cannot be loaded ({one_line(error)[:300]}); pass a folder written by "
            "save_pretrained, or a hub id where the hub is reachable."
        ) from None
    except Exception as error:
        # Config overrides reach the architecture's constructor, which fails on a bad one with any error
        # (ValueError, TypeError, ZeroDivisionError, huggingface_hub's validation errors...): all are a bad option.
        fix = "; check --num-classes, --img-size and --model-kwargs" if config_overrides else ""
        raise ValueError(f"{named} cannot be built ({one_line(error)[:300]}){fix}.") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # from_pretrained fills what the files lack at random: a classifier read from them would explain noise.
        raise ValueError(
            f"{named}: its saved weights lack {len(missing)} tensors of {type(model).__name__} "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which would be random; save the whole "
            "model with save_pretrained, or pass --checkpoint FILE with them."
        )
    # transformers 5 loads weights in their saved dtype (half precision on the hub); 4.x has no `dtype` argument.
    return model.float().eval()


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def hf_classifier(
    model: nn.Module,
    source: str,
    class_names: list[str] | None = None,
    prompt: str = DEFAULT_PROMPT,
    head: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Class logits from a model of [`load_hf_model`][gmar_lightning.model_loading.load_hf_model]: an image classifier
    as it is; an image-text model zero-shot from ``class_names`` with its saved tokenizer
    ([`hf_zero_shot`][gmar_lightning.classifiers.hf_zero_shot]); a backbone (or an image-text model's image embedding)
    under the linear ``head`` ([`with_linear_head`][gmar_lightning.classifiers.with_linear_head] on its pooled
    output).

    Args:
        model: The loaded model.
        source: The folder or hub id it came from (its tokenizer is loaded from there), as ``--model hf:`` names it.
        class_names: The zero-shot classes of an image-text model.
        prompt: The template each zero-shot class name fills.
        head: A linear head's tensors (``weight`` ``[classes, dim]``, ``bias``) for a model without a classifier.

    Raises:
        ValueError: In one line naming the fix: a classifier given a head, a model without class logits given neither
            class names nor a head, an image-text folder without a tokenizer, or a model ``explain`` does not support.
    """
    named = f"--model {HF_PREFIX}{source}"
    name = type(model).__name__
    if _is_classifier(model):
        if head is not None:
            raise ValueError(f"{named} holds {name}, which has its own classifier; drop --head.")
        classifier = model
    elif head is not None:
        features = hf_image_features(model)
        classifier = with_linear_head(features, head, features.dim, "--head")
    elif _is_image_text(model):
        if class_names is None:
            raise ValueError(
                f"{named} holds {name}, an image-text model whose class logits are zero-shot: pass --labels "
                "'cat,dog,...' (or --class-names FILE) to name the classes (the prompt is --prompt, default "
                f"{DEFAULT_PROMPT!r}), or --head FILE for a linear head on its image embedding."
            )
        transformers = _transformers(source)
        location = _resolve_hf_source(source)
        # transformers 5 builds an empty tokenizer for a folder saved without one: its prompts would all be alike.
        if Path(location).is_dir() and not any((Path(location) / file).is_file() for file in _TOKENIZER_FILES):
            raise ValueError(
                f"{named} holds {name} but no tokenizer ({' or '.join(_TOKENIZER_FILES)}); save the model's "
                "tokenizer (or processor) into the folder with save_pretrained."
            )
        try:
            with _quiet(transformers):
                tokenizer = transformers.AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"{named} holds {name} but no tokenizer it can load ({one_line(error)[:200]}); save the model's "
                "tokenizer (or processor) into the folder with save_pretrained."
            ) from None
        classifier = hf_zero_shot(model, tokenizer, class_names, prompt)
    else:
        raise ValueError(
            f"{named} holds {name}, a backbone with neither a classifier nor a text tower, so it outputs features, not "
            "classes; pass --head FILE (a linear head on its pooled output: weight [classes, dim], bias [classes]; "
            "--labels names its classes), or save a *ForImageClassification model."
        )
    reason = unsupported_reason(classifier)
    if reason is not None:
        raise ValueError(f"{named} cannot be explained: {reason}.")
    return classifier.eval()


OPEN_CLIP_PREFIXES = ("hf-hub:", "local-dir:")
"""How ``--model`` names an open_clip model: ``local-dir:<folder>`` (``open_clip_config.json`` and weights) or
``hf-hub:<owner/name>``."""
INSTALL_OPEN_CLIP = 'pip install open_clip_torch (or pip install -e ".[open_clip]" in your gmar-lightning clone)'


def load_open_clip(name: str, load_saved_weights: bool = True) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """An open_clip model and its tokenizer from ``local-dir:<folder>`` or ``hf-hub:<owner/name>``.

    Args:
        name: The open_clip model name, with its prefix.
        load_saved_weights: Load the saved weights (required then: open_clip would otherwise start from random ones);
            ``False`` builds the architecture with fresh weights, for
            [`load_weights`][gmar_lightning.model_loading.load_weights] to fill.

    Returns:
        The model (eval mode, float32) and its tokenizer.

    Raises:
        ValueError: open_clip is missing, or the model cannot be loaded, in one line.
    """
    named = f"--model {name}"
    try:
        import open_clip
    except ImportError:
        raise ValueError(f"{named} names an open_clip model, which needs open_clip: {INSTALL_OPEN_CLIP}.") from None
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            what = "does not exist" if not folder.is_dir() else "holds no open_clip_config.json"
            raise ValueError(
                f"{named} {what}; pass local-dir:<folder> holding open_clip_config.json and the weights "
                "(open_clip_model.safetensors), as open_clip's push_to_hf_hub writes them."
            )
    root = logging.getLogger()
    level = root.manager.disable
    logging.disable(logging.WARNING)  # open_clip logs its steps and fallbacks on the root logger
    try:
        model = open_clip.create_model(name, load_weights=load_saved_weights, require_pretrained=load_saved_weights)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # open_clip raises RuntimeError, ValueError, OSError or hub errors for one cause
        fix = "pass local-dir:<folder> with open_clip_config.json and weights, or hf-hub: where the hub is reachable"
        if load_saved_weights and "pretrained weights" in str(error).lower():
            fix = "the folder holds no weights; pass --checkpoint FILE, or --random-weights to explain a random network"
        raise ValueError(f"{named} cannot be loaded as an open_clip model ({one_line(error)[:300]}); {fix}.") from None
    finally:
        logging.disable(level)
    return model.float().eval(), tokenizer


def open_clip_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    name: str,
    class_names: list[str] | None = None,
    prompt: str = DEFAULT_PROMPT,
    head: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """Class logits from an open_clip model: zero-shot from ``class_names``
    ([`open_clip_zero_shot`][gmar_lightning.classifiers.open_clip_zero_shot]), or the linear ``head`` on its image
    embedding.

    Raises:
        ValueError: Neither class names nor a head, in one line naming both.
    """
    if head is not None:
        return with_linear_head(model.visual, head, model.visual.output_dim, "--head").eval()
    if class_names is None:
        raise ValueError(
            f"--model {name} is an open_clip model, whose class logits are zero-shot: pass --labels 'cat,dog,...' (or "
            f"--class-names FILE) to name the classes (the prompt is --prompt, default {DEFAULT_PROMPT!r}), or --head "
            "FILE for a linear head on its image embedding."
        )
    return open_clip_zero_shot(model, tokenizer, class_names, prompt).eval()


def hf_image_processor_settings(source: str) -> dict[str, Any] | None:
    """The image processor saved with a Hugging Face model (``preprocessor_config.json``), or ``None`` if none is."""
    transformers = _transformers(source)
    location = _resolve_hf_source(source)
    if Path(location).is_dir() and not (Path(location) / "preprocessor_config.json").is_file():
        return None
    try:
        settings, _ = transformers.ImageProcessingMixin.get_image_processor_dict(location)
    except OSError:
        if Path(location).is_dir():
            raise
        return None  # a hub model without a saved processor
    return settings


def hf_naflex_processor(source: str, model: nn.Module) -> tuple[Any, str]:
    """SigLIP 2's image processor and where it came from: the one saved with the model (``preprocessor_config.json``,
    loaded by ``AutoImageProcessor``), else ``Siglip2ImageProcessor``'s defaults with the model's own patch size and
    ``num_patches`` as ``max_num_patches`` (the defaults, 16 px and 256, would not fit another model).

    Raises:
        ValueError: The saved processor's patch size is not the model's, in one line naming the fix.
    """
    transformers = _transformers(source)
    location = _resolve_hf_source(source)
    vision = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    if hf_image_processor_settings(source) is None:
        processor = transformers.Siglip2ImageProcessor(patch_size=vision.patch_size, max_num_patches=vision.num_patches)
        return processor, "no image processor saved: Siglip2ImageProcessor's defaults at the model's patch size"
    with _quiet(transformers):
        processor = transformers.AutoImageProcessor.from_pretrained(location)
    if getattr(processor, "patch_size", None) != vision.patch_size:
        raise ValueError(
            f"--model {HF_PREFIX}{source} saved a {type(processor).__name__} with patch_size "
            f"{getattr(processor, 'patch_size', None)} but the model's patches are {vision.patch_size} px; save the "
            "model's own processor into the folder with save_pretrained."
        )
    return processor, "the saved image processor"
