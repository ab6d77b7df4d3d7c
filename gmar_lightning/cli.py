"""The ``gmar-lightning`` command: ``explain`` images, build a run ``report``, or train the ``demo``.

```bash
gmar-lightning explain cat.jpg dogs/ --model vit_small_patch16_224 --checkpoint vit_s.pth --method gmar_l1,rollout
gmar-lightning explain shapes/ --checkpoint runs/gmar_demo/version_0/checkpoints/last.ckpt
gmar-lightning explain cat.jpg --model hf:my_vit/ --checkpoint pruned_vit.pth
gmar-lightning explain cat.jpg --model hf:my_clip/ --labels cat,dog,bird --prompt "a photo of a {}."
gmar-lightning explain cat.jpg --model hf:my_dinov3/ --head head.pth --labels cat,dog
gmar-lightning explain cat.jpg --model local-dir:my_open_clip/ --labels cat,dog
gmar-lightning report runs/gmar_demo/version_0
gmar-lightning demo --epochs 5
```

Every failure the user can fix (a missing file, an unknown model name, a bad option) prints one line to stderr and
exits with status 2; nothing prints a traceback. An image ``explain`` cannot explain faithfully (unreadable, too
small, pixels of unknown range) gets one such line and is skipped: the others are explained, and the exit status is 2
at the end. A checkpoint's stored [`InputRecipe`][gmar_lightning.input_recipe.InputRecipe] sets the input and the
class names unless flags override it.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so it must come before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from tqdm.auto import tqdm

from gmar_lightning._checks import one_line, parse_methods
from gmar_lightning._io import atomic_write_bytes
from gmar_lightning.classifiers import DEFAULT_PROMPT, ZeroShotClassifier, check_prompt
from gmar_lightning.demos.config import LOGGERS, DemoConfig
from gmar_lightning.engine import explain
from gmar_lightning.explanation import METHODS
from gmar_lightning.families import hf
from gmar_lightning.input_recipe import InputRecipe
from gmar_lightning.model_loading import (
    HF_PREFIX,
    OPEN_CLIP_PREFIXES,
    checkpoint_input_recipe,
    checkpoint_model_settings,
    create_vit,
    hf_classifier,
    hf_image_processor_settings,
    hf_naflex_processor,
    load_hf_model,
    load_open_clip,
    load_weights,
    open_clip_classifier,
)
from gmar_lightning.render import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    MODES,
    check_overlay_style,
    explanation_figure,
    figure_to_png_bytes,
    methods_figure,
)
from gmar_lightning.report import build_report
from gmar_lightning.resolve import resolve_model

__all__ = ["add_demo_arguments", "add_model_arguments", "config_from_args", "hf_preprocessing", "main", "positive_int"]

PROG = "gmar-lightning"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXIT_ERROR = 2


class CommandError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the fix, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------------------------


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from files and folders (searched recursively for common image extensions), in argument order.

    Raises:
        CommandError: If an input does not exist or a folder holds no image.
    """
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(file for file in path.rglob("*") if file.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CommandError(f"folder {item!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise CommandError(f"image {item!r} does not exist; pass image files or folders of images.")
    return images


@dataclass
class Preprocessing:
    """How an image becomes the model's input.

    With ``resize="shorter_side"`` (timm's eval transform) the shorter side is resized to ``floor(img_size /
    crop_pct)`` pixels with ``interpolation`` and the centred ``img_size x img_size`` square is cropped; with
    ``"squash"`` both sides are resized to ``img_size``. The pixels, scaled to ``[0, 1]``, are then normalised with
    ``mean`` and ``std``.
    """

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    resize: str = "shorter_side"

    @property
    def resize_to(self) -> int:
        """The side the shorter image side is resized to before the centre crop."""
        return math.floor(self.img_size / self.crop_pct)

    def describe(self) -> str:
        """One line saying how the model input was made."""
        side = f"{self.img_size}x{self.img_size}"
        if self.resize == "squash":
            geometry = f"resized to {side} ({self.interpolation}, aspect ratio not kept)"
        else:
            geometry = f"shorter side resized to {self.resize_to} px ({self.interpolation}), centre {side} crop"
        return f"{geometry}, normalised with mean {_numbers(self.mean)} and std {_numbers(self.std)}"

    def transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalised ``[3, S, S]`` tensor: timm's eval transform, or a resize to the square."""
        if self.resize == "squash":
            from torchvision import transforms

            return transforms.Compose(
                [
                    transforms.Resize(
                        (self.img_size, self.img_size),
                        interpolation=transforms.InterpolationMode(self.interpolation),
                        antialias=True,
                    ),
                    transforms.ToTensor(),
                    transforms.Normalize(self.mean, self.std),
                ]
            )
        return timm.data.create_transform(
            input_size=(3, self.img_size, self.img_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode="center",
        )

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` in the original image's pixels of the square the model sees.

        Follows torchvision's ``Resize`` (shorter side to `resize_to`, longer side truncated) and
        ``CenterCrop`` (offsets rounded), which timm's eval transform uses; a squashed image is seen whole.

        Examples:
            >>> Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0).crop_box(100, 50)
            (25.0, 0.0, 75.0, 50.0)
        """
        if self.resize == "squash":
            return (0.0, 0.0, float(width), float(height))
        short, long = sorted((width, height))
        resized_long = int(self.resize_to * long / short)
        resized_width, resized_height = (
            (self.resize_to, resized_long) if width <= height else (resized_long, self.resize_to)
        )
        left = round((resized_width - self.img_size) / 2.0)
        top = round((resized_height - self.img_size) / 2.0)
        x_scale, y_scale = width / resized_width, height / resized_height
        return (
            left * x_scale,
            top * y_scale,
            (left + self.img_size) * x_scale,
            (top + self.img_size) * y_scale,
        )


@dataclass
class NaFlexPreprocessing:
    """SigLIP 2's input: its own image processor (``Siglip2ImageProcessor``) on the images of a batch, as
    ``processor(images=..., return_tensors="pt")``. It resizes each whole image, keeping its aspect ratio, to the
    largest grid of ``patch_size`` patches within ``max_num_patches``, rescales, normalises, patchifies and pads: no
    crop, so each map covers its whole image.

    Args:
        processor: The processor (saved with the model, else built with the model's patch size and ``num_patches``).
        origin: Where the processor came from, for the printed recipe.
        mean: Overrides the processor's ``image_mean`` (``--mean``).
        std: Overrides the processor's ``image_std`` (``--std``).
    """

    processor: Any
    origin: str
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    @property
    def patch_size(self) -> int:
        return int(self.processor.patch_size)

    def _overrides(self) -> dict[str, Any]:
        overrides = {"image_mean": self.mean, "image_std": self.std}
        return {key: list(value) for key, value in overrides.items() if value is not None}

    def describe(self) -> str:
        """The recipe in one line, e.g. ``Siglip2ImageProcessor: up to 256 patches of 16x16 px, ...``."""
        processor, settings = self.processor, {**vars(self.processor), **self._overrides()}
        resize = "each image resized keeping its aspect ratio" if processor.do_resize else "no resize"
        normalised = "no normalisation"
        if processor.do_normalize:
            normalised = f"mean {_numbers(settings['image_mean'])}, std {_numbers(settings['image_std'])}"
        rescaled = f"pixels x {processor.rescale_factor:g}" if processor.do_rescale else "no rescale"
        return (
            f"{type(processor).__name__}: up to {processor.max_num_patches} patches of {self.patch_size}x"
            f"{self.patch_size} px, {resize}, {rescaled}, {normalised}, no crop ({self.origin})"
        )

    def batch(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """The NaFlex dict of ``images``: ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``."""
        return dict(self.processor(images=images, return_tensors="pt", **self._overrides()))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The whole image: the processor resizes it without cropping."""
        return 0.0, 0.0, float(width), float(height)


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{value:.3g}" for value in values) + ")"


def model_preprocessing(
    model: nn.Module,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    recipe: InputRecipe | None = None,
) -> Preprocessing:
    """The model's input recipe: the stored ``recipe`` where it states a field, else the model's timm data config;
    ``mean``, ``std`` and ``crop_pct`` override both.

    The input side comes from the built model (timm's data config keeps the pretrained size when the model was built
    for another ``img_size``).
    """
    recipe = recipe or InputRecipe()
    config = timm.data.resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    side = int(img_size[0]) if img_size is not None else int(config["input_size"][-1])
    return Preprocessing(
        img_size=side,
        mean=tuple(_first(mean, recipe.mean, config["mean"])),
        std=tuple(_first(std, recipe.std, config["std"])),
        interpolation=str(_first(recipe.interpolation, config["interpolation"])),
        crop_pct=float(_first(crop_pct, recipe.crop_pct, config.get("crop_pct"), 1.0)),
        resize=_first(recipe.resize, "shorter_side"),
    )


def _first(*values: Any) -> Any:
    """The first value that is not ``None``."""
    return next(value for value in values if value is not None)


# PIL's resampling filters by the integer that Hugging Face image processors save as ``resample``.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
HF_DEFAULT_PROCESSOR = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "resample": 2}
"""What a Hugging Face model without a saved image processor gets: ``ViTImageProcessor``'s defaults."""


def _side(value: Any) -> int | None:
    """A processor's ``size``/``crop_size`` as one side: an int, ``{"height": ...}`` or ``{"shortest_edge": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("shortest_edge") or value.get("height")
    return int(value) if isinstance(value, int | float) else None


def _three(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(item) for item in value) if isinstance(value, Sequence) else (float(value),) * 3


def hf_preprocessing(
    model: nn.Module,
    processor: Mapping[str, Any] | None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
) -> Preprocessing:
    """A Hugging Face classifier's input recipe; ``mean``, ``std`` and ``crop_pct`` override it.

    The side is the one the model's config was built for (``image_size``). ``processor`` is the saved image
    processor's settings ([`hf_image_processor_settings`][gmar_lightning.model_loading.hf_image_processor_settings]):
    its ``image_mean``/``image_std`` (0 and 1 when ``do_normalize`` is off), its ``resample`` filter, and, when it
    centre-crops, the fraction ``crop_size / size`` its crop keeps. ``None`` (no processor saved) means
    [`HF_DEFAULT_PROCESSOR`][gmar_lightning.cli.HF_DEFAULT_PROCESSOR]: mean and std 0.5, bilinear, no crop. The image
    is always resized by its shorter side and centre-cropped, keeping its aspect ratio, also where the processor
    would squash it to a square (``ViTImageProcessor``), so each map can be placed back on the image it explains.
    """
    settings = {**HF_DEFAULT_PROCESSOR, **(processor or {})}
    normalise = settings.get("do_normalize", True)
    crop_side, resize_side = _side(settings.get("crop_size")), _side(settings.get("size"))
    processor_crop = 1.0
    if settings.get("do_center_crop") and crop_side and resize_side:
        processor_crop = min(1.0, crop_side / resize_side)
    image_size = hf.vision_config(model).image_size
    resample = settings.get("resample")
    return Preprocessing(
        img_size=int(image_size if isinstance(image_size, int) else image_size[0]),
        mean=tuple(mean if mean is not None else _three(settings["image_mean"] if normalise else 0.0)),
        std=tuple(std if std is not None else _three(settings["image_std"] if normalise else 1.0)),
        interpolation=_PIL_RESAMPLE.get(int(resample), "bilinear") if isinstance(resample, int) else "bilinear",
        crop_pct=float(crop_pct if crop_pct is not None else processor_crop),
    )


def open_clip_preprocessing(
    model: nn.Module,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
) -> Preprocessing:
    """An open_clip model's input recipe, from its image tower's ``preprocess_cfg`` (what ``open_clip``'s own eval
    transform uses: the side, mean, std and interpolation; the shorter side resized and centre-cropped, or with
    ``resize_mode='squash'`` both sides resized); ``mean``, ``std`` and ``crop_pct`` override it.

    Raises:
        CommandError: ``resize_mode='longest'`` (the image padded to a square), whose maps would cover padding.
    """
    settings = getattr(model.visual, "preprocess_cfg", None) or {}
    resize = settings.get("resize_mode", "shortest")
    if resize not in ("shortest", "squash"):
        raise CommandError(
            f"the open_clip model pads its images to a square (resize_mode={resize!r}), which the command does not "
            "do; explain it from Python with open_clip's own transform."
        )
    side = settings.get("size", model.visual.image_size)
    return Preprocessing(
        img_size=_pair(side)[0],
        mean=tuple(mean if mean is not None else _three(settings.get("mean", HF_DEFAULT_PROCESSOR["image_mean"]))),
        std=tuple(std if std is not None else _three(settings.get("std", HF_DEFAULT_PROCESSOR["image_std"]))),
        interpolation=str(settings.get("interpolation", "bicubic")),
        crop_pct=float(crop_pct if crop_pct is not None else 1.0),
        resize="squash" if resize == "squash" else "shorter_side",
    )


MIN_IMAGE_SIDE = 16
"""Images with a side below this many pixels are refused: upsampled to the model's input they hold less than a
ViT-B/16 patch of information, and their maps would explain interpolation."""
MAX_SHOWN_SIDE = 2048
"""Overlays of larger images are drawn downscaled to this longer side (a note says so); maps stay at model
resolution."""
MIN_SHOWN_WIDTH = 320
"""Overlays of narrower images are drawn enlarged by a whole factor (nearest neighbour), so the caption fits."""

# PIL modes that hold more than 8 bits per channel: 16-bit greyscale is scaled, the others have no defined range.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be explained (one line naming the fix), or ``None`` if it can.

    Reads only the file's header: whether PIL can identify it, its pixel type and its size.
    """
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        return _unreadable_image(path, error)
    if mode in _UNSCALED_MODES:
        return (
            f"image {str(path)!r} holds {_UNSCALED_MODES[mode]} pixels, whose display range is unknown; save it as an "
            "8- or 16-bit PNG first."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        return (
            f"image {str(path)!r} is {width}x{height} px, smaller than {MIN_IMAGE_SIDE} px on a side; pass an image "
            f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px."
        )
    return None


def _unreadable_image(path: Path, error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        # PIL refuses images whose pixel count could exhaust memory (a "decompression bomb").
        return f"image {str(path)!r} is too large to read safely ({one_line(error)}); downscale it first."
    return f"cannot read image {str(path)!r} ({one_line(error)}); pass PNG, JPEG or similar."


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, as a viewer shows it.

    16-bit greyscale pixels are scaled to 8 bits (``round(v / 257)``, so ``65535`` is white), not clipped at 255;
    PIL already reads 16-bit colour PNGs as 8-bit.

    Raises:
        CommandError: If PIL cannot read the file or it is not an image ``explain`` takes
            ([`image_problem`][gmar_lightning.cli.image_problem]).
    """
    problem = image_problem(path)
    if problem is not None:
        raise CommandError(problem)
    try:
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT_MODES:
                pixels = np.asarray(image).astype(np.float64) / 257.0
                return Image.fromarray(np.rint(pixels).astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise CommandError(_unreadable_image(path, error)) from None


def load_image(path: Path, preprocessing: Preprocessing) -> Tensor:
    """Read an image and make the model's input from it (see [`Preprocessing`][gmar_lightning.cli.Preprocessing]).

    Raises:
        CommandError: If PIL cannot read the file.
    """
    return preprocessing.transform()(read_rgb(path))


def _read_names(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise CommandError(f"--class-names {path!r} cannot be read ({one_line(error)}); pass a text file.") from None


def read_class_names(path: str | None, num_classes: int) -> list[str] | None:
    """Class names from a text file, one per line in class-index order (blank lines skipped).

    Raises:
        CommandError: If the file is missing or names fewer classes than the model has.
    """
    if path is None:
        return None
    names = _read_names(path)
    if len(names) < num_classes:
        raise CommandError(
            f"--class-names {path!r} names {len(names)} classes but the model has {num_classes}; "
            "write one name per line for every class."
        )
    return names[:num_classes]


def map_to_original(saliency: Tensor, box: tuple[float, float, float, float], width: int, height: int) -> Tensor:
    """A ``[S, S]`` map of the model's input placed back on the original ``[height, width]`` image.

    The map is resized bilinearly onto ``box`` (the crop the model saw, in original pixels); pixels the model did
    not see are ``NaN``.

    Examples:
        >>> placed = map_to_original(torch.ones(4, 4), (2.0, 0.0, 6.0, 4.0), width=8, height=4)
        >>> placed[0].tolist()
        [nan, nan, 1.0, 1.0, 1.0, 1.0, nan, nan]
    """
    left, top, right, bottom = (round(value) for value in box)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, width), min(bottom, height)
    resized = torch.nn.functional.interpolate(
        saliency[None, None].float(), size=(bottom - top, right - left), mode="bilinear", align_corners=False
    )[0, 0]
    placed = torch.full((height, width), float("nan"))
    placed[top:bottom, left:right] = resized.clamp(0.0, 1.0)
    return placed


def _is_hf(model_name: str | None) -> bool:
    return model_name is not None and model_name.startswith(HF_PREFIX)


def _is_open_clip(model_name: str | None) -> bool:
    return model_name is not None and model_name.startswith(OPEN_CLIP_PREFIXES)


def _num_classes(model: nn.Module) -> int:
    """A timm model's (or zero-shot or linear-head classifier's) ``num_classes``, a Hugging Face classifier's
    ``config.num_labels``."""
    return model.num_classes if hasattr(model, "num_classes") else model.config.num_labels


def _check_patches_fit(input_size: Sequence[int], patch_size: Sequence[int]) -> None:
    if any(side < patch for side, patch in zip(input_size, patch_size, strict=True)):
        raise CommandError(
            f"--img-size {input_size[0]} is smaller than the model's {patch_size[0]}-pixel patches; pass --img-size "
            f"{patch_size[0]} or more."
        )


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _zero_shot_names(args: argparse.Namespace) -> list[str] | None:
    """The class names a model without a classifier is given: ``--labels``, else the ``--class-names`` file."""
    if args.labels is not None:
        return args.labels
    return _read_names(args.class_names) if args.class_names is not None else None


def _read_head(path: str | None) -> dict[str, Tensor] | None:
    """The tensors of ``--head FILE`` (read with ``weights_only=True``)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise CommandError(f"--head {path!r} does not exist; pass torch.save(nn.Linear(dim, classes).state_dict()).")
    try:
        head = timm.models.load_state_dict(path, use_ema=False, weights_only=True)
    except Exception:
        raise CommandError(
            f"--head {path!r} is not a weights file PyTorch can read safely; pass torch.save(nn.Linear(dim, "
            "classes).state_dict()) or a .safetensors file."
        ) from None
    return dict(head)


def _check_no_class_count(args: argparse.Namespace, model: nn.Module) -> None:
    """``--num-classes`` sizes a classifier that is built; zero-shot and head classifiers have their classes given."""
    if args.num_classes is None or not isinstance(getattr(model, "num_classes", None), int):
        return
    if args.num_classes != model.num_classes:
        given = "--labels (or --class-names)" if isinstance(model, ZeroShotClassifier) else "--head (its weight's rows)"
        raise CommandError(
            f"--num-classes {args.num_classes} differs from the {model.num_classes} classes of {given}; drop "
            "--num-classes."
        )


def _build_hf_model(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """A Hugging Face model named ``hf:<folder or hub id>``: the folder's weights, or its architecture filled from
    ``--checkpoint`` (pruned like the model that wrote it) or left random (``--random-weights``); with class logits
    of its own, zero-shot from ``--labels`` (image-text models) or from ``--head``. Returns the classifier and the
    transformers model (whose config gives the input recipe)."""
    if args.pretrained:
        raise CommandError(
            f"--pretrained downloads timm weights, but --model {args.model} loads its own (or --checkpoint FILE); "
            "drop --pretrained."
        )
    overrides = dict(args.model_kwargs)
    if args.num_classes is not None:
        overrides["num_labels"] = args.num_classes
    if args.img_size is not None:
        overrides["image_size"] = args.img_size  # SigLIP 2 ignores it; refused below once the config shows which
    source = args.model.removeprefix(HF_PREFIX)
    load_saved_weights = args.checkpoint is None and not args.random_weights
    loaded = load_hf_model(source, overrides, load_saved_weights)
    if hf.naflex(loaded) is not None:
        _check_naflex_options(args, loaded)
    else:
        vision = hf.vision_config(loaded)
        _check_patches_fit(_pair(vision.image_size), _pair(vision.patch_size))
    if args.checkpoint is not None:
        load_weights(loaded, args.checkpoint, strict=not args.partial_checkpoint)
    model = hf_classifier(loaded, source, _zero_shot_names(args), args.prompt, _read_head(args.head))
    if model is not loaded:
        _check_no_class_count(args, model)
    return model, loaded


def _check_naflex_options(args: argparse.Namespace, loaded: nn.Module) -> None:
    """Refuse what SigLIP 2 (NaFlex input: its processor sizes each image itself, with no crop) cannot honour."""
    for option, value in (("--img-size", args.img_size), ("--crop-pct", args.crop_pct)):
        if value is not None:
            raise CommandError(
                f"{option} does not apply to --model {args.model}: SigLIP 2 resizes each image keeping its aspect "
                "ratio to at most the processor's max_num_patches patches, with no crop; drop it (save a "
                "Siglip2ImageProcessor with another max_num_patches into the folder to change the size)."
            )
    if not type(loaded).__name__.endswith("ForImageClassification"):
        raise CommandError(
            f"--model {args.model} holds {type(loaded).__name__}: the command line explains SigLIP 2 as "
            "Siglip2ForImageClassification only (its zero-shot and --head classifiers take image tensors); explain "
            "it from Python with your own head (docs/guide/huggingface.md#siglip-2-naflex-batches)."
        )


def _build_open_clip_model(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """An open_clip model named ``local-dir:<folder>`` or ``hf-hub:<owner/name>``, zero-shot from ``--labels`` or
    under ``--head``. Returns the classifier and the open_clip model (whose image tower gives the input recipe)."""
    for option, value in (
        ("--pretrained", args.pretrained),
        ("--img-size", args.img_size),
        ("--model-kwargs", args.model_kwargs),
    ):
        if value:
            raise CommandError(f"{option} does not apply to open_clip models (--model {args.model}); drop {option}.")
    load_saved_weights = args.checkpoint is None and not args.random_weights
    loaded, tokenizer = load_open_clip(args.model, load_saved_weights)
    if args.checkpoint is not None:
        load_weights(loaded, args.checkpoint, strict=not args.partial_checkpoint)
    model = open_clip_classifier(
        loaded, tokenizer, args.model, _zero_shot_names(args), args.prompt, _read_head(args.head)
    )
    _check_no_class_count(args, model)
    return model, loaded


def _build_model(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """The model to explain, from the options, filled in from a ViTClassifier checkpoint's stored settings; and the
    model whose configuration gives the input recipe (a Hugging Face or open_clip model inside a zero-shot or head
    classifier, else the model itself)."""
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CommandError(f"checkpoint {args.checkpoint!r} does not exist; pass a weights file.")
    if args.labels is not None and args.class_names is not None:
        raise CommandError("--labels and --class-names both name the classes; pass one of them.")
    check_prompt(args.prompt, "--prompt")
    if _is_hf(args.model):
        return _build_hf_model(args)
    if _is_open_clip(args.model):
        return _build_open_clip_model(args)
    if args.head is not None:
        raise CommandError(
            "--head puts a linear head on a backbone's pooled output, for hf: and open_clip models; a timm model has "
            "its own (--num-classes, --checkpoint); drop --head."
        )
    stored = checkpoint_model_settings(args.checkpoint) if args.checkpoint else None
    if args.model is None and stored is None:
        raise CommandError(
            f"--model is required unless --checkpoint is a gmar-lightning .ckpt; pass a timm name or "
            f"{HF_PREFIX}<save_pretrained folder>."
        )
    stored = stored or {}
    model_name = args.model or stored["model_name"]
    if not timm.is_model(model_name):
        raise CommandError(f"unknown timm model {model_name!r}; see timm.list_models('vit*') for valid names.")
    if args.checkpoint is None and not args.pretrained and not args.random_weights:
        # Per-image stretching of the maps makes a random network's noise look like an explanation.
        raise CommandError(
            f"--model {model_name} has no weights: pass --checkpoint FILE or --pretrained, or --random-weights to "
            "explain a randomly initialised network on purpose."
        )
    num_classes = args.num_classes or stored.get("num_classes") or 1000
    img_size = args.img_size or stored.get("img_size")
    model_kwargs = {**(stored.get("model_kwargs") or {}), **args.model_kwargs}
    try:
        model = create_vit(
            model_name,
            num_classes,
            img_size=img_size,
            pretrained=args.pretrained,
            checkpoint_path=args.checkpoint,
            model_kwargs=model_kwargs,
            strict=not args.partial_checkpoint,
        )
    except AssertionError as error:  # timm checks its constructor arguments with assert
        raise CommandError(
            f"--model {model_name} cannot be built with --model-kwargs {model_kwargs} ({one_line(error)})."
        ) from None
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    input_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if patch_size is not None and input_size is not None:
        _check_patches_fit(input_size, patch_size)
    return model.eval(), model


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems made unique by appending ``_2``, ``_3``, ... to repeats, so outputs never overwrite each other.

    Examples:
        >>> _unique_stems([Path("a/x.png"), Path("b/x.jpg"), Path("x_2.png"), Path("y.png")])
        ['x', 'x_2', 'x_2_2', 'y']
    """
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, count = path.stem, 1
        while stem in used:
            count += 1
            stem = f"{path.stem}_{count}"
        used.add(stem)
        stems.append(stem)
    return stems


@dataclass
class ExplainStyle:
    """How ``explain`` draws its outputs."""

    cmap: str
    alpha: float
    class_names: list[str] | None
    side_by_side: bool
    random_weights: bool = False
    mode: str = "blended"
    outlier_percentile: float = 0.0


def percent(probability: float) -> str:
    """A probability as a percentage with one decimal, so small ones do not all read ``0%``.

    Examples:
        >>> percent(0.004), percent(0.9734), percent(0.00002)
        ('0.4%', '97.3%', '<0.1%')
    """
    return "<0.1%" if probability < 0.001 else f"{probability:.1%}"


def _class_name(index: int, class_names: list[str] | None) -> str:
    return class_names[index] if class_names is not None else f"class {index}"


def _caption(method: str, prediction: int, probability: float, style: ExplainStyle, target: int | None) -> str:
    explained = ""
    if target is not None and target != prediction:
        explained = f", explaining {_class_name(target, style.class_names)}"
    marked = "[random weights] " if style.random_weights else ""
    return f"{marked}{method}: {_class_name(prediction, style.class_names)} ({percent(probability)}){explained}"


def shown_image(original: Image.Image) -> Image.Image:
    """The image as its overlay shows it: reduced to [`MAX_SHOWN_SIDE`][gmar_lightning.cli.MAX_SHOWN_SIDE] when
    larger, enlarged by a whole factor (nearest neighbour) to at least
    [`MIN_SHOWN_WIDTH`][gmar_lightning.cli.MIN_SHOWN_WIDTH] when narrower, else itself.

    Examples:
        >>> shown_image(Image.new("RGB", (8000, 4000))).size, shown_image(Image.new("RGB", (100, 50))).size
        ((2048, 1024), (400, 200))
    """
    width, height = original.size
    if max(width, height) > MAX_SHOWN_SIDE:
        scale = MAX_SHOWN_SIDE / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return original.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if width < MIN_SHOWN_WIDTH:
        factor = math.ceil(MIN_SHOWN_WIDTH / width)
        return original.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    return original


@dataclass
class _Results:
    """What ``explain`` computed for the images it could read, in order."""

    files: list[Path]
    maps: dict[str, list[Tensor]]
    head_weights: dict[str, list[Tensor]]
    predictions: list[Tensor]
    probabilities: list[Tensor]
    boxes: list[tuple[float, float, float, float]]
    sizes: list[tuple[int, int]]
    outputs: list[str]
    grid_sizes: list[tuple[int, int]]
    map_sizes: list[tuple[int, int]]
    bad: int = 0


def _report_bad(message: str) -> None:
    """One line for an image that is skipped; the run goes on and exits with status 2."""
    tqdm.write(f"{PROG} explain: error: {message}", file=sys.stderr)


def _explain_files(
    model: nn.Module,
    paths: list[Path],
    methods: list[str],
    batch_size: int,
    target: int | None,
    output: Path,
    preprocessing: Preprocessing | NaFlexPreprocessing,
    style: ExplainStyle,
) -> _Results:
    """Explain ``paths`` batch by batch and write one captioned overlay PNG per image and method (plus a
    side-by-side of the methods when asked); an image that cannot be read gets one line and is skipped. A NaFlex
    model's maps are each on its image's own grid (``Explanation.grid_sizes``), kept here at that size."""
    stems = _unique_stems(paths)
    results = _Results([], {method: [] for method in methods}, {}, [], [], [], [], [], [], [])
    naflex = isinstance(preprocessing, NaFlexPreprocessing)
    transform = None if naflex else preprocessing.transform()
    device = next(model.parameters()).device
    kept_at = (
        "on each image's own patch grid"
        if isinstance(preprocessing, NaFlexPreprocessing)
        else f"at the model's {preprocessing.img_size}x{preprocessing.img_size}"
    )
    resolved = resolve_model(model)  # once for every batch and method
    # disable=None: a bar only on a terminal, so logs and captured output hold one line per event.
    for start in tqdm(range(0, len(paths), batch_size), desc="explaining", unit="batch", disable=None):
        originals, kept = [], []
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                originals.append(read_rgb(paths[index]))
            except CommandError as error:
                _report_bad(str(error))
                results.bad += 1
                continue
            kept.append(index)
        if not kept:
            continue
        if isinstance(preprocessing, NaFlexPreprocessing):
            images = {key: value.to(device) for key, value in preprocessing.batch(originals).items()}
        else:
            images = torch.stack([transform(image) for image in originals]).to(device)  # type: ignore[misc]
        explanations = {method: explain(resolved, images, method=method, target=target).cpu() for method in methods}
        first = next(iter(explanations.values()))
        batch_predictions = first.predictions
        batch_probabilities = first.logits.softmax(dim=-1).gather(1, batch_predictions[:, None])[:, 0]
        results.predictions.append(batch_predictions)
        results.probabilities.append(batch_probabilities)
        for offset, (index, original) in enumerate(zip(kept, originals, strict=True)):
            path, width, height = paths[index], *original.size
            box = preprocessing.crop_box(width, height)
            results.files.append(path)
            results.boxes.append(box)
            results.sizes.append((width, height))
            own_maps = {method: explanation.maps[offset] for method, explanation in explanations.items()}
            if naflex:
                grid = first.grid_sizes[offset]  # type: ignore[index]
                results.grid_sizes.append((int(grid[0]), int(grid[1])))
                rows, columns = (int(cells) * preprocessing.patch_size for cells in grid)  # type: ignore[union-attr]
                results.map_sizes.append((rows, columns))
                own_maps = {method: own[:rows, :columns] for method, own in own_maps.items()}
            shown = shown_image(original)
            scale_x, scale_y = shown.width / width, shown.height / height
            if shown.width < width:
                print(
                    f"Note: {str(path)!r} is {width}x{height} px; its overlays are drawn at {shown.width}x"
                    f"{shown.height}, and maps.npz keeps the maps {kept_at}."
                )
            shown_box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
            pixels = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 255.0).permute(2, 0, 1)
            prediction, probability = int(batch_predictions[offset]), float(batch_probabilities[offset])
            placed = {}
            for method, own in own_maps.items():
                placed[method] = map_to_original(own, shown_box, shown.width, shown.height)
                caption = _caption(method, prediction, probability, style, target)
                figure = explanation_figure(pixels, placed[method], caption, style.cmap, style.alpha, box=shown_box,
                                            mode=style.mode, outlier_percentile=style.outlier_percentile)  # fmt: skip
                name = f"{stems[index]}_{method}.png"
                atomic_write_bytes(output / name, figure_to_png_bytes(figure))
                results.outputs.append(name)
            marked = "[random weights] " if style.random_weights else ""
            title = f"{marked}{path.name}: {_class_name(prediction, style.class_names)} ({percent(probability)})"
            tqdm.write(title)
            if style.side_by_side:
                figure = methods_figure(pixels, placed, title, style.cmap, style.alpha, mode=style.mode,
                                        outlier_percentile=style.outlier_percentile)  # fmt: skip
                name = f"{stems[index]}_methods.png"
                atomic_write_bytes(output / name, figure_to_png_bytes(figure))
                results.outputs.append(name)
        for method, explanation in explanations.items():
            results.maps[method].append(explanation.maps)
            if explanation.head_weights is not None:
                results.head_weights.setdefault(method, []).append(explanation.head_weights)
    return results


def _arrays(results: _Results, class_names: list[str] | None) -> dict[str, np.ndarray]:
    """The contents of maps.npz; ``outputs`` names the files this run wrote, so the next run can replace them.

    A NaFlex model's maps are of different sizes: each is kept at its own size in the top-left corner of the largest,
    the rest NaN (never resampled), with ``grid_sizes`` (each image's patch grid) and ``map_sizes`` (its map's size).
    """
    arrays = {f"maps_{method}": _nan_padded(values).numpy() for method, values in results.maps.items()}
    arrays.update(
        {f"head_weights_{method}": torch.cat(values).numpy() for method, values in results.head_weights.items()}
    )
    arrays["predictions"] = torch.cat(results.predictions).numpy()
    arrays["probabilities"] = torch.cat(results.probabilities).numpy()
    arrays["crop_boxes"] = np.asarray(results.boxes, dtype=np.float32)
    arrays["image_sizes"] = np.asarray(results.sizes, dtype=np.int64)
    arrays["files"] = np.asarray([str(path) for path in results.files], dtype=np.str_)
    arrays["outputs"] = np.asarray(results.outputs, dtype=np.str_)
    if results.grid_sizes:
        arrays["grid_sizes"] = np.asarray(results.grid_sizes, dtype=np.int64)
        arrays["map_sizes"] = np.asarray(results.map_sizes, dtype=np.int64)
    if class_names is not None:
        arrays["class_names"] = np.asarray(class_names, dtype=np.str_)
    return arrays


def _nan_padded(batches: list[Tensor]) -> Tensor:
    """The maps of all batches in one ``[N, H, W]``: NaFlex batches, each NaN-padded to its largest image, padded with
    NaN to the largest of the run (the maps of fixed-size models are all alike and pass unchanged)."""
    height, width = max(batch.shape[-2] for batch in batches), max(batch.shape[-1] for batch in batches)
    padded = [
        torch.nn.functional.pad(batch, (0, width - batch.shape[-1], 0, height - batch.shape[-2]), value=float("nan"))
        for batch in batches
    ]
    return torch.cat(padded)


MAPS_FILE = "maps.npz"


def _earlier_outputs(output: Path) -> set[str]:
    """The files an earlier ``explain`` run wrote into ``output`` (its maps.npz lists them), with maps.npz."""
    try:
        with np.load(output / MAPS_FILE) as arrays:
            return {*arrays["outputs"].tolist(), MAPS_FILE} if "outputs" in arrays.files else set()
    except (OSError, ValueError, KeyError):
        return set()


def claim_output(output: Path) -> int:
    """Make ``output`` hold this run's files only: remove what an earlier ``explain`` run wrote there.

    Returns:
        How many earlier files were removed.

    Raises:
        CommandError: If ``output`` is a file, or holds anything no earlier ``explain`` run wrote (nothing of the
            user's is ever deleted).
    """
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {str(output)!r} is a file; pass a folder.")
    present = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
    if not present:
        return 0
    earlier = _earlier_outputs(output)
    foreign = [name for name in present if name not in earlier]
    if foreign:
        raise CommandError(
            f"--output {str(output)!r} holds files that no earlier explain run wrote there ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); pass a new or empty folder."
        )
    for name in present:
        (output / name).unlink()
    return len(present)


def hf_class_names(model: nn.Module) -> list[str] | None:
    """A Hugging Face classifier's class names from its config's ``id2label``, or ``None`` where they are only
    transformers' placeholders (``LABEL_0``, ``LABEL_1``, ...) or do not cover every class."""
    config = model.config
    labels = {int(key): str(value) for key, value in (getattr(config, "id2label", None) or {}).items()}
    if sorted(labels) != list(range(config.num_labels)):
        return None
    if all(labels[index] == f"LABEL_{index}" for index in labels):
        return None
    return [labels[index] for index in range(config.num_labels)]


def _class_names(
    args: argparse.Namespace, model: nn.Module, recipe: InputRecipe, num_classes: int
) -> tuple[list[str] | None, str]:
    """The class names for captions and where they came from: ``--labels`` or ``--class-names`` (a zero-shot model's
    classes), the checkpoint, ``id2label``."""
    if isinstance(model, ZeroShotClassifier):
        return model.class_names, "--labels" if args.labels is not None else "--class-names"
    if args.labels is not None:
        if len(args.labels) != num_classes:
            raise CommandError(
                f"--labels names {len(args.labels)} classes but the model has {num_classes}; name every class once."
            )
        return args.labels, "--labels"
    names = read_class_names(args.class_names, num_classes)
    if names is not None:
        return names, "--class-names"
    if recipe.class_names is not None and len(recipe.class_names) == num_classes:
        return list(recipe.class_names), "the checkpoint"
    if _is_hf(args.model) and hasattr(model, "config"):  # a transformers classifier, not one made of a backbone
        names = hf_class_names(model)
        if names is not None:
            return names, "the config's id2label"
    return None, ""


def _run_explain(args: argparse.Namespace) -> int:
    paths = collect_images(args.inputs)
    methods = parse_methods(args.method or ["gmar_l1"])
    check_overlay_style(args.cmap, args.alpha, args.mode, args.outlier_percentile)
    problems = {path: problem for path in paths if (problem := image_problem(path)) is not None}
    for problem in problems.values():
        _report_bad(problem)
    paths = [path for path in paths if path not in problems]
    if not paths:
        return EXIT_ERROR
    model, loaded = _build_model(args)
    model = model.to(args.device)
    num_classes = _num_classes(model)
    if args.target is not None and not 0 <= args.target < num_classes:
        raise CommandError(f"--target {args.target} is out of range for a model with {num_classes} classes.")
    recipe = checkpoint_input_recipe(args.checkpoint) if args.checkpoint is not None else InputRecipe()
    class_names, names_origin = _class_names(args, model, recipe, num_classes)
    style = ExplainStyle(
        args.cmap, args.alpha, class_names, args.side_by_side, args.random_weights, args.mode, args.outlier_percentile
    )
    stored = " (from the checkpoint, where no flag overrides it)" if recipe.mean is not None else ""
    preprocessing: Preprocessing | NaFlexPreprocessing
    if _is_hf(args.model) and hf.naflex(loaded) is not None:
        processor, origin = hf_naflex_processor(args.model.removeprefix(HF_PREFIX), loaded)
        preprocessing = NaFlexPreprocessing(
            processor,
            origin,
            args.mean if args.mean is not None else recipe.mean,
            args.std if args.std is not None else recipe.std,
        )
        print(f"Model input: {preprocessing.describe()}{stored}")
    elif _is_hf(args.model):
        processor = hf_image_processor_settings(args.model.removeprefix(HF_PREFIX))
        preprocessing = hf_preprocessing(
            loaded,
            processor,
            args.mean if args.mean is not None else recipe.mean,
            args.std if args.std is not None else recipe.std,
            args.crop_pct if args.crop_pct is not None else recipe.crop_pct,
        )
        origin = "the saved image processor" if processor is not None else "no image processor saved: defaults"
        print(f"Model input: {preprocessing.describe()} ({origin}){stored}")
    elif _is_open_clip(args.model):
        preprocessing = open_clip_preprocessing(
            loaded,
            args.mean if args.mean is not None else recipe.mean,
            args.std if args.std is not None else recipe.std,
            args.crop_pct if args.crop_pct is not None else recipe.crop_pct,
        )
        print(f"Model input: {preprocessing.describe()} (the model's preprocess_cfg){stored}")
    else:
        preprocessing = model_preprocessing(model, args.mean, args.std, args.crop_pct, recipe)
        print(f"Model input: {preprocessing.describe()}{stored}")
    if names_origin and names_origin not in ("--class-names", "--labels"):
        shown = ", ".join(class_names[:5]) + (", ..." if num_classes > 5 else "")  # type: ignore[index]
        print(f"Class names from {names_origin}: {shown}")
    output = Path(args.output)
    removed = claim_output(output)
    if removed:
        print(f"Removed the {removed} files of the earlier run in {output}")
    results = _explain_files(model, paths, methods, args.batch_size, args.target, output, preprocessing, style)
    if results.files:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **_arrays(results, class_names))
        atomic_write_bytes(output / MAPS_FILE, buffer.getvalue())
        extra = " and side-by-sides" if style.side_by_side else ""
        print(f"Wrote {len(results.files) * len(methods)} overlays{extra} and {MAPS_FILE} to {output}")
    bad = len(problems) + results.bad
    if bad:
        print(f"Skipped {bad} image{'s' if bad != 1 else ''} that could not be explained (listed above).")
        return EXIT_ERROR
    return 0


# ----------------------------------------------------------------------------------------------------------------
# report and demo
# ----------------------------------------------------------------------------------------------------------------


def _run_report(args: argparse.Namespace) -> int:
    report = build_report(args.run, output_dir=args.output, title=args.title)
    methods = len(report.overlays)
    overlays = f"overlays of {methods} method{'s' if methods != 1 else ''}" if methods else "no overlays found"
    print(f"Wrote {len(report.plots)} plots and {report.html_path} ({overlays})")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    # Imported here, not at the top: training imports Lightning (seconds), which explain and report never use.
    from gmar_lightning.demos.job import run_demo

    run_demo(config_from_args(args))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser and entry point
# ----------------------------------------------------------------------------------------------------------------


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}); e.g. '{{\"depth\": 2}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def _positive(text: str, convert: Callable[[str], float], kind: str) -> float:
    """``text`` converted, if it is a number above zero, else a one-line argparse error naming ``kind``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive {kind}, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive {kind}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer, with a one-line error otherwise."""
    return int(_positive(text, int, "integer"))


def _positive_float(text: str) -> float:
    return _positive(text, float, "number")


def add_model_arguments(parser: argparse.ArgumentParser, hugging_face: bool = False) -> None:
    """The options that build a model: ``--model``, ``--model-kwargs``, ``--img-size``, ``--checkpoint``.

    With ``hugging_face`` the help also describes ``--model hf:<folder or hub id>`` (what ``explain`` accepts).
    """
    if hugging_face:
        model_help = (
            f"timm model name; {HF_PREFIX}<folder written by save_pretrained, or hub id> for a Hugging Face image "
            "classifier, image-text model (CLIP, SigLIP: zero-shot from --labels) or backbone (with --head), or a "
            "Siglip2ForImageClassification (its input made by the folder's saved image processor, else "
            "Siglip2ImageProcessor's defaults at the model's patch size); or an open_clip local-dir:<folder> or "
            "hf-hub:<owner/name> (zero-shot from --labels)"
        )
        kwargs_help = "timm constructor overrides (hf: config overrides) as JSON, e.g. '{\"depth\": 2}'"
    else:
        model_help = "timm model name (default: a small 4-layer ViT)"
        kwargs_help = 'timm constructor overrides as JSON, e.g. \'{"depth": 2, "patch_size": 8}\''
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--model-kwargs", type=_json_dict, default={}, metavar="JSON", help=kwargs_help)
    parser.add_argument(
        "--img-size", type=positive_int, default=None, help="input side in pixels (not SigLIP 2: its processor sizes)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="local weights file (.pth, .safetensors, .ckpt); weights of a pruned model are loaded pruned alike; for "
        "demo, its own checkpoints/last.ckpt resumes that run (one line says which of the two happens)",
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of [`DemoConfig`][gmar_lightning.demos.config.DemoConfig] to ``parser`` (shared by the example
    script and the CLI)."""
    defaults = DemoConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: shapes)")
    data.add_argument("--max-train-images", type=positive_int, default=None, help="training images (shapes: 3000)")
    data.add_argument("--max-val-images", type=positive_int, default=None, help="validation images (shapes: 500)")
    data.add_argument("--num-workers", type=int, default=defaults.num_workers, help="DataLoader workers")
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--pretrained", action="store_true", help="start from timm hub weights (needs internet)")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", "--max-epochs", type=positive_int, default=defaults.epochs)
    training.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    training.add_argument("--lr", type=_positive_float, default=defaults.lr, help="peak AdamW learning rate")
    training.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    training.add_argument(
        "--target-acc",
        type=_target_accuracy,
        default=defaults.target_acc,
        help=f"stop once val_acc reaches this (default {defaults.target_acc}; 0 trains every epoch)",
    )
    training.add_argument("--seed", type=int, default=defaults.seed)
    training.add_argument("--accelerator", default=defaults.accelerator, help="Trainer accelerator (cpu, gpu, ...)")
    training.add_argument("--devices", default=defaults.devices, help="Trainer devices (auto, 2, '0,1')")
    training.add_argument("--strategy", default=defaults.strategy, help="Trainer strategy (auto, ddp, ...)")
    training.add_argument("--precision", default=None, help="Trainer precision (32-true, bf16-mixed, ...)")
    training.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help="hide the progress bar")
    logging = parser.add_argument_group("logging")
    logging.add_argument("--logger", choices=LOGGERS, default=defaults.logger)
    logging.add_argument("--log-dir", default=defaults.log_dir, help="root directory of the logs")
    logging.add_argument(
        "--methods",
        "--method",
        action="append",
        default=None,
        help=f"explanation methods, repeatable or comma-separated: {', '.join(METHODS)} (default gmar_l1 and "
        "grad_rollout, from one pass)",
    )
    logging.add_argument("--num-probe", type=positive_int, default=defaults.num_probe, help="images explained")
    logging.add_argument("--every-n-epochs", type=positive_int, default=defaults.every_n_epochs)
    logging.add_argument("--cmap", default=defaults.cmap, help=f"overlay colour map (default {defaults.cmap})")
    logging.add_argument("--alpha", type=float, default=defaults.alpha, help="overlay opacity in [0, 1]")
    _add_display_arguments(logging)


def _add_display_arguments(group: argparse._ActionsContainer) -> None:
    """``--mode`` and ``--outlier-percentile``, the same for ``explain`` and the demo's overlays."""
    group.add_argument(
        "--mode",
        choices=MODES,
        default="blended",
        help="how maps are drawn: blended (colour map over the image, --alpha its weight), masked (the image times the "
        "map) or heat_map (the map alone); default blended",
    )
    group.add_argument(
        "--outlier-percentile",
        type=float,
        default=0.0,
        help="saturate each map's top percent before drawing it, in [0, 100) (default 0: no clipping)",
    )


def _target_accuracy(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be an accuracy in [0, 1] (0 trains every epoch), got {text!r}")
    return value or None


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Turn parsed [`add_demo_arguments`][gmar_lightning.cli.add_demo_arguments] options into a
    [`DemoConfig`][gmar_lightning.demos.config.DemoConfig]."""
    fields = {name: getattr(args, name) for name in DemoConfig.__dataclass_fields__ if hasattr(args, name)}
    fields["methods"] = parse_methods(args.methods or DemoConfig().methods)
    return DemoConfig(**fields)


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data, so nothing can be explained; use cpu or cuda")
    return device


def _labels(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"must be two or more distinct, non-empty class names separated by commas, e.g. 'cat,dog', got {text!r}"
        )
    return names


def _unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``gmar-lightning`` argument parser with its ``explain``, ``report`` and ``demo`` subcommands."""
    parser = _OneLineParser(prog=PROG, description="GMAR explanations and attention-head importance for timm ViTs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser, metavar="COMMAND")

    explain_parser = commands.add_parser(
        "explain",
        help="overlay GMAR maps on images",
        description="Explain images with a timm ViT, a Hugging Face model (--model hf:<folder>) or an open_clip model "
        "(--model local-dir:<folder>).",
    )
    explain_parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    add_model_arguments(explain_parser, hugging_face=True)
    explain_parser.add_argument("--num-classes", type=positive_int, default=None, help="classifier classes")
    explain_parser.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    explain_parser.add_argument(
        "--random-weights",
        action="store_true",
        help="explain a randomly initialised --model (no --checkpoint or --pretrained; hf: not the folder's weights): "
        "for testing only",
    )
    explain_parser.add_argument(
        "--partial-checkpoint",
        action="store_true",
        help="load only the --checkpoint tensors that fit the model and keep the others freshly initialised "
        "(default: every tensor must match)",
    )
    explain_parser.add_argument(
        "--method", action="append", default=None, help="method(s), repeatable or comma-separated (default gmar_l1)"
    )
    explain_parser.add_argument("--target", type=int, default=None, help="class to explain (default: predicted)")
    explain_parser.add_argument(
        "--class-names",
        metavar="FILE",
        default=None,
        help="text file with one class name per line, for captions (default: the checkpoint's, hf: id2label), or "
        "the zero-shot classes of an image-text model",
    )
    explain_parser.add_argument(
        "--labels",
        type=_labels,
        default=None,
        metavar="NAMES",
        help="comma-separated class names: the zero-shot classes of an image-text model (CLIP, SigLIP, open_clip), or "
        "the captions' names of any other model, in class-index order",
    )
    explain_parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"zero-shot prompt template, {{}} standing for each class name (default {DEFAULT_PROMPT!r})",
    )
    explain_parser.add_argument(
        "--head",
        metavar="FILE",
        default=None,
        help="a linear head for an hf: backbone without a classifier (DINOv3ViTModel, CLIPVisionModel, ...) or an "
        "image-text model: torch.save(nn.Linear(dim, classes).state_dict()), applied to the model's pooled output "
        "(an image-text model's image embedding)",
    )
    explain_parser.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        metavar="M",
        help="input normalisation mean (default: the checkpoint's recipe, else the model's)",
    )
    explain_parser.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        metavar="S",
        help="input normalisation std (default: the checkpoint's recipe, else the model's)",
    )
    explain_parser.add_argument(
        "--crop-pct",
        type=_unit_fraction,
        default=None,
        help="fraction of the resized image the centre crop keeps (default: timm's, usually 0.9; hf: the saved "
        "processor's crop_size / size, else 1; not SigLIP 2, which is not cropped)",
    )
    explain_parser.add_argument("--cmap", default=DEFAULT_CMAP, help=f"matplotlib colour map (default {DEFAULT_CMAP})")
    explain_parser.add_argument(
        "--alpha", type=_unit_fraction, default=DEFAULT_ALPHA, help=f"map opacity in (0, 1] (default {DEFAULT_ALPHA})"
    )
    _add_display_arguments(explain_parser)
    explain_parser.add_argument(
        "--side-by-side", action="store_true", help="also write <image>_methods.png with every method next to the image"
    )
    explain_parser.add_argument(
        "--output",
        default="gmar_explanations",
        help="output folder; an earlier explain run's files there are replaced, a folder holding others is refused",
    )
    explain_parser.add_argument("--batch-size", type=positive_int, default=16, help="images per pass")
    explain_parser.add_argument(
        "--device",
        type=_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs (cpu, cuda, cuda:1)",
    )
    explain_parser.set_defaults(handler=_run_explain)

    report_parser = commands.add_parser(
        "report", help="plots and an HTML page of a run", description="Build a run's head-importance report."
    )
    report_parser.add_argument("run", help="run directory holding head_importance.npz, or the file itself")
    report_parser.add_argument("--output", default=None, help="output folder (default: <run>/report)")
    report_parser.add_argument("--title", default=None, help="page title")
    report_parser.set_defaults(handler=_run_report)

    demo_parser = commands.add_parser(
        "demo", help="fine-tune a ViT with GMARCallback", description="Fine-tune a ViT with GMARCallback."
    )
    add_demo_arguments(demo_parser)
    demo_parser.set_defaults(handler=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 on a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"{PROG} {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
