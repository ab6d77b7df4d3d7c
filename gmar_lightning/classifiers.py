"""Class logits for models that make none of their own, so that they can be explained like classifiers.

An explanation is of a class logit. An image-text model (CLIP, SigLIP, from transformers or open_clip) has none, but
makes them zero-shot from class names: [`ZeroShotClassifier`][gmar_lightning.classifiers.ZeroShotClassifier] holds its
image tower and the text embeddings of one prompt per class, computed once without gradients, and gives the logits the
model's own forward gives for that image and those texts (``logits_per_image``): the model's logit scale (and SigLIP's
bias) times the cosine similarity. A backbone without a text tower (``DINOv3ViTModel``, ``CLIPVisionModel``) gets a
linear head of the user's own on its pooled output ([`with_linear_head`][gmar_lightning.classifiers.with_linear_head]).

```python
import transformers
from gmar_lightning import explain
from gmar_lightning.classifiers import hf_zero_shot

clip = transformers.CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
tokenizer = transformers.AutoTokenizer.from_pretrained("openai/clip-vit-base-patch32")
classifier = hf_zero_shot(clip, tokenizer, ["cat", "dog"])  # prompts "a photo of a cat.", "a photo of a dog."
explanation = explain(classifier, images)  # images normalised as the model's image processor does
```

Neither transformers nor open_clip is imported here: the functions take the user's loaded model and tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_PROMPT",
    "HFImageFeatures",
    "LinearProbe",
    "ZeroShotClassifier",
    "check_prompt",
    "hf_image_features",
    "hf_zero_shot",
    "open_clip_zero_shot",
    "with_linear_head",
]

DEFAULT_PROMPT = "a photo of a {}."
"""The prompt each class name fills (``{}``) when none is given: the template of CLIP's zero-shot evaluation."""


def check_prompt(prompt: str, named: str = "`prompt`") -> str:
    """``prompt`` if it holds exactly one ``{}`` for the class name (``named`` names it in the error).

    Raises:
        ValueError: Otherwise, in one line naming the fix.
    """
    if not isinstance(prompt, str) or prompt.count("{}") != 1 or prompt.replace("{}", "").count("{") > 0:
        raise ValueError(
            f"{named} {prompt!r} must hold exactly one {{}} where the class name goes (and no other braces), e.g. "
            f"{DEFAULT_PROMPT!r}."
        )
    return prompt


def _class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(name).strip() for name in class_names] if not isinstance(class_names, str) else []
    if len(names) < 2 or not all(names):
        raise ValueError(
            f"`class_names` must name at least two classes, none empty, to give zero-shot logits; got {class_names!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` {names} repeat a name; each class needs its own name.")
    return names


class ZeroShotClassifier(nn.Module):
    """Zero-shot class logits of an image-text model: ``scale * cos(image embedding, class embedding) + bias``.

    Args:
        image_encoder: Maps images ``[B, C, H, W]`` to image embeddings ``[B, D]`` (the model's image tower with its
            projection), the module whose ViT is explained.
        class_embeddings: ``[K, D]`` text embeddings, one per class (normalised here; kept as a buffer, no gradient).
        logit_scale: The multiplier of the cosine similarity: ``model.logit_scale.exp()``.
        logit_bias: The added bias (SigLIP), or ``None``.
        class_names: The class names, in class-index order.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        class_embeddings: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(f"`class_embeddings` must be [classes, dim], got shape {tuple(class_embeddings.shape)}.")
        self.image_encoder = image_encoder
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale).detach().float().reshape(()))
        bias = None if logit_bias is None else torch.as_tensor(logit_bias).detach().float().reshape(())
        self.register_buffer("logit_bias", bias)
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        """The number of classes (class embeddings)."""
        return self.class_embeddings.shape[0]

    def forward(self, images: Tensor) -> Tensor:
        features = F.normalize(self.image_encoder(images), dim=-1)
        logits = self.logit_scale.to(features.dtype) * features @ self.class_embeddings.to(features.dtype).T
        return logits if self.logit_bias is None else logits + self.logit_bias.to(features.dtype)


class HFImageFeatures(nn.Module):
    """A transformers vision model's features for images: its pooled output (``pooler_output``, or the projected
    ``image_embeds`` of a ``*WithProjection`` model), passed through ``projection`` when one is given (CLIP's
    ``visual_projection``).

    Args:
        vision: The transformers vision model (``CLIPVisionModel``, ``SiglipVisionModel``, ``DINOv3ViTModel``...).
        projection: A linear map applied to the pooled output, or ``None``.
        dim: The feature width (``projection``'s output, else the model's).
    """

    def __init__(self, vision: nn.Module, projection: nn.Module | None, dim: int) -> None:
        super().__init__()
        self.vision, self.projection, self.dim = vision, projection, dim

    def forward(self, images: Tensor) -> Tensor:
        output = self.vision(pixel_values=images)
        pooled = getattr(output, "image_embeds", None)
        pooled = output.pooler_output if pooled is None else pooled
        return pooled if self.projection is None else self.projection(pooled)


def hf_image_features(model: nn.Module) -> HFImageFeatures:
    """The image features of a transformers image-text model (``CLIPModel``, ``SiglipModel``: the image embedding its
    zero-shot logits compare) or vision backbone (``CLIPVisionModel``, ``SiglipVisionModel``, ``DINOv3ViTModel``,
    ``Dinov2Model``, ...: its pooled output).

    Raises:
        ValueError: The model has no pooled output (built without a pooling layer or head).
    """
    config = model.config
    vision = getattr(model, "vision_model", None)
    if hasattr(config, "vision_config") and vision is not None:  # an image-text model
        projection = getattr(model, "visual_projection", None)
        dim = projection.out_features if projection is not None else config.vision_config.hidden_size
        return HFImageFeatures(vision, projection, dim)
    name = type(model).__name__
    if name.endswith("WithProjection"):
        return HFImageFeatures(model, None, config.projection_dim)
    if getattr(model, "pooler", True) is None or getattr(config, "vision_use_head", True) is False:
        raise ValueError(
            f"`model` ({name}) was built without its pooling layer or head, so it has no pooled output for a head to "
            "read; build it with one (add_pooling_layer=True, vision_use_head=True) or put your own head on its tokens."
        )
    return HFImageFeatures(model, None, config.hidden_size)


def _check_distinct(token_ids: Tensor, names: list[str]) -> None:
    """Refuse prompts that tokenise alike: their classes would get equal logits (a tokenizer without the
    vocabulary, such as one transformers builds empty for a folder saved without its tokenizer files)."""
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            if torch.equal(token_ids[first], token_ids[second]):
                raise ValueError(
                    f"the tokenizer turns the prompts of {names[first]!r} and {names[second]!r} into the same tokens, "
                    "so their logits would be equal; use the model's own tokenizer (saved with it by save_pretrained)."
                )


@torch.no_grad()
def _text_embeddings(encode: Callable[[Any], Tensor], tokens: Any) -> Tensor:
    return encode(tokens).float()


def hf_zero_shot(
    model: nn.Module,
    tokenizer: Callable[..., Mapping[str, Tensor]],
    class_names: Sequence[str],
    prompt: str = DEFAULT_PROMPT,
) -> ZeroShotClassifier:
    """Zero-shot logits of a transformers ``CLIPModel``, ``SiglipModel`` (or another model with ``get_text_features``,
    ``logit_scale`` and a ``vision_model``): the model's own ``logits_per_image`` for the prompts of ``class_names``.

    Each prompt is tokenised padded to the text model's ``max_position_embeddings`` (how SigLIP was trained; CLIP pools
    at its end-of-text token, before the padding). Their embeddings are computed once, without gradients.

    Args:
        model: The image-text model, in eval mode.
        tokenizer: Its tokenizer (``AutoTokenizer.from_pretrained`` of the same folder or hub id).
        class_names: One name per class, in class-index order.
        prompt: The template each name fills, with one ``{}``.
    """
    names = _class_names(class_names)
    check_prompt(prompt)
    max_length = model.config.text_config.max_position_embeddings
    tokens = tokenizer(
        [prompt.format(name) for name in names],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    _check_distinct(tokens["input_ids"], names)
    device = model.logit_scale.device
    tokens = {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}

    def encode(inputs: dict[str, Tensor]) -> Tensor:
        output = model.get_text_features(**inputs)
        return output if isinstance(output, Tensor) else output.pooler_output  # transformers 5 returns an output

    embeddings = _text_embeddings(encode, tokens)
    bias = getattr(model, "logit_bias", None)
    return ZeroShotClassifier(hf_image_features(model), embeddings, model.logit_scale.exp(), bias, names)


def open_clip_zero_shot(
    model: nn.Module, tokenizer: Callable[[list[str]], Tensor], class_names: Sequence[str], prompt: str = DEFAULT_PROMPT
) -> ZeroShotClassifier:
    """Zero-shot logits of an open_clip model (``CLIP``, ``CustomTextCLIP``): what its ``get_logits(image, text)``
    gives for the prompts of ``class_names``, with the image tower ``model.visual`` explained.

    Args:
        model: The open_clip model, in eval mode.
        tokenizer: ``open_clip.get_tokenizer`` of the same model name.
        class_names: One name per class, in class-index order.
        prompt: The template each name fills, with one ``{}``.
    """
    names = _class_names(class_names)
    check_prompt(prompt)
    tokens = tokenizer([prompt.format(name) for name in names])
    _check_distinct(tokens, names)
    tokens = tokens.to(model.logit_scale.device)
    embeddings = _text_embeddings(model.encode_text, tokens)
    bias = getattr(model, "logit_bias", None)
    return ZeroShotClassifier(model.visual, embeddings, model.logit_scale.exp(), bias, names)


class LinearProbe(nn.Module):
    """A linear head on features: ``head(features(images))``.

    Args:
        features: Maps images to ``[B, D]`` features, the module whose ViT is explained.
        head: The ``nn.Linear(D, classes)``.
    """

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features, self.head = features, head

    @property
    def num_classes(self) -> int:
        """The number of classes (the head's outputs)."""
        return self.head.out_features

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def with_linear_head(features: nn.Module, head: Mapping[str, Tensor], dim: int, named: str = "`head`") -> LinearProbe:
    """``features`` followed by the linear head stored in ``head``: a state dict with ``weight`` ``[classes, dim]``
    and optionally ``bias`` ``[classes]`` (``torch.save(nn.Linear(dim, classes).state_dict())``).

    Args:
        features: Maps images to ``[B, dim]`` features (e.g.
            [`hf_image_features`][gmar_lightning.classifiers.hf_image_features]).
        head: The head's tensors.
        dim: The width of ``features``' output.
        named: How the head is named in errors (the CLI's ``--head FILE``).

    Raises:
        ValueError: The tensors are not a linear head for ``dim`` features, in one line.
    """
    weight, bias = head.get("weight"), head.get("bias")
    extra = sorted(set(head) - {"weight", "bias"})
    expected = f"a linear head's state dict, weight [classes, {dim}] and bias [classes]"
    if not isinstance(weight, Tensor) or weight.dim() != 2 or extra:
        found = f"tensors {sorted(head)[:4]}" if head else "no tensor"
        raise ValueError(f"{named} holds {found}, not {expected} (torch.save(nn.Linear({dim}, classes).state_dict())).")
    if weight.shape[1] != dim:
        raise ValueError(
            f"{named}'s weight is {list(weight.shape)}, but the model's pooled output has {dim} features; pass "
            f"{expected}."
        )
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{named}'s bias has shape {list(getattr(bias, 'shape', []))}; pass {expected}.")
    linear = nn.Linear(dim, weight.shape[0], bias=bias is not None)
    linear.load_state_dict({key: value.float() for key, value in head.items()})
    return LinearProbe(features, linear)
