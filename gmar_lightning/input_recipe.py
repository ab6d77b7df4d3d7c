"""How images became a model's input in training, stored in its checkpoints so ``gmar-lightning explain`` does the same.

A checkpoint written by a fit with [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] or of
[`ViTClassifier`][gmar_lightning.demos.model.ViTClassifier] holds an
[`InputRecipe`][gmar_lightning.input_recipe.InputRecipe] under
[`INPUT_RECIPE_KEY`][gmar_lightning.input_recipe.INPUT_RECIPE_KEY]: the normalisation, the input side, how an image
is resized to it, and the class names. The fields nobody knew stay ``None``. A data module states its recipe once,
as an ``input_recipe`` attribute (the demo's [`ShapesDataModule`][gmar_lightning.demos.data.ShapesDataModule] and
[`ImageFolderDataModule`][gmar_lightning.demos.image_folder.ImageFolderDataModule] do), and everything else reads it
from there.

Examples:
    >>> recipe = InputRecipe(img_size=64, mean=(0.3,) * 3, std=(0.2,) * 3, class_names=("circle", "square"))
    >>> InputRecipe.from_dict(recipe.to_dict()) == recipe
    True
    >>> InputRecipe(mean=(0.5,) * 3, std=(0.5,) * 3).merged_over(recipe).mean
    (0.5, 0.5, 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["INPUT_RECIPE_KEY", "RESIZE_POLICIES", "InputRecipe", "datamodule_recipe"]

INPUT_RECIPE_KEY = "gmar_input_recipe"
"""The checkpoint key (top level, next to ``state_dict``) that holds
[`InputRecipe.to_dict`][gmar_lightning.input_recipe.InputRecipe.to_dict]."""

RESIZE_POLICIES = ("shorter_side", "squash")
"""``"shorter_side"``: the shorter side is resized to ``floor(img_size / crop_pct)`` and the centred square cropped
(timm's eval transform); ``"squash"``: both sides are resized to ``img_size``, the aspect ratio is not kept."""


@dataclass(frozen=True)
class InputRecipe:
    """A model's input recipe; ``None`` marks a field nobody stated.

    Attributes:
        img_size: The square input side in pixels.
        mean: Per-channel normalisation mean of pixels in ``[0, 1]``.
        std: Per-channel normalisation std.
        resize: One of [`RESIZE_POLICIES`][gmar_lightning.input_recipe.RESIZE_POLICIES].
        crop_pct: The fraction of the resized shorter side the centre crop keeps (``"shorter_side"`` only).
        interpolation: The resampling filter, as timm names it (``"bilinear"``, ``"bicubic"``, ...).
        class_names: Class names in class-index order.
    """

    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("`mean` and `std` of an InputRecipe must be given together.")
        if self.resize is not None and self.resize not in RESIZE_POLICIES:
            raise ValueError(f"`resize` must be one of {RESIZE_POLICIES}, got {self.resize!r}.")
        # Plain tuples whatever sequence came in, so recipes compare equal and pickle with weights_only loading.
        for name in ("mean", "std", "class_names"):
            value = getattr(self, name)
            if value is not None:
                convert = str if name == "class_names" else float
                object.__setattr__(self, name, tuple(convert(item) for item in value))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain Python values (lists, not tuples), which ``torch.load(weights_only=True)`` reads."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InputRecipe:
        """The recipe [`to_dict`][gmar_lightning.input_recipe.InputRecipe.to_dict] wrote; unknown keys are ignored.

        Raises:
            ValueError: If ``values`` is not a mapping or holds invalid fields.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"an input recipe must be a dict, got {type(values).__name__}.")
        names = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in values.items() if key in names})
        except TypeError as error:
            raise ValueError(f"the input recipe {dict(values)} is invalid ({error}).") from None

    def merged_over(self, base: InputRecipe) -> InputRecipe:
        """This recipe with every field it leaves ``None`` taken from ``base``."""
        return InputRecipe(
            **{
                field.name: getattr(base, field.name)
                if getattr(self, field.name) is None
                else getattr(self, field.name)
                for field in dataclasses.fields(self)
            }
        )

    def is_empty(self) -> bool:
        """Whether no field is known."""
        return all(getattr(self, field.name) is None for field in dataclasses.fields(self))


def datamodule_recipe(trainer: Any) -> InputRecipe:
    """The ``input_recipe`` of the trainer's data module, or an empty recipe when it states none."""
    recipe = getattr(getattr(trainer, "datamodule", None), "input_recipe", None)
    return recipe if isinstance(recipe, InputRecipe) else InputRecipe()
