"""Models whose attention has no token rollout, each with the one-line reason given to the user.

Matched by class name, so no model module has to be imported. ``MODEL_REASONS`` is keyed by the model class,
``MODULE_REASONS`` by an attention (or pooling) class found anywhere inside the model.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MODEL_REASONS", "MODULE_REASONS", "NO_ATTENTION_REASONS", "refusal"]

_DIFFERENTIAL = (
    "its differential attention mixes tokens with softmax(Q1 K1^T) - lambda * softmax(Q2 K2^T), a signed matrix "
    "that is not a distribution over tokens, so attention rollout is not defined for it"
)

MODULE_REASONS: dict[str, str] = {
    "DiffAttention": _DIFFERENTIAL,
    "DiffParallelScalingBlock": _DIFFERENTIAL,
}

_NOT_MAPPED = "gmar-lightning does not map it yet"

MODEL_REASONS: dict[str, str] = {
    # Attention that is not a distribution over tokens: rollout is not defined.
    "Xcit": "its cross-covariance attention (XCA) mixes feature channels, not tokens, so there is no token rollout",
    "EdgeNeXt": "its cross-covariance attention mixes feature channels, not tokens, so there is no token rollout",
    "DaVit": "it alternates window attention with channel attention, which mixes feature channels, not tokens",
    "VOLO": (
        "its outlook attention aggregates each local window with weights predicted from one token (no query-key "
        "attention over tokens), so there is no token rollout"
    ),
    "CoaT": (
        "its factorised attention softmaxes the keys over tokens and aggregates key-value products, so it has no "
        "token-to-token attention matrix to roll out"
    ),
    "EfficientVit": "its ReLU linear attention has no token-to-token attention matrix to roll out",
    "EfficientVitLarge": "its ReLU linear attention has no token-to-token attention matrix to roll out",
    "SwiftFormer": "its additive attention has no token-to-token attention matrix to roll out",
    "EfficientViM": "its hidden-state mixer is a state-space layer, not attention, so there is no token rollout",
    "EfficientVitMsra": (
        "its cascaded group attention feeds each head the previous head's output, so the heads are not parallel "
        "distributions over the same tokens"
    ),
    # Two token spaces at once.
    "CrossVit": (
        "its cross-attention exchanges class tokens between two branches with different patch grids, which share no "
        "token space to roll out over"
    ),
    "TNT": "its inner attention mixes pixels inside each patch and its outer attention mixes patches, two token spaces",
    # Token maps without a linear relevance map.
    "Nest": "it aggregates its blocks with convolution and max pooling between levels, which has no linear token map",
    # Attention that changes the token set inside the attention, or runs inside a CNN.
    "Levit": f"its attention-downsampling blocks replace the grid by a subsampled query grid; {_NOT_MAPPED}",
    "LevitDistilled": (
        f"its attention-downsampling blocks replace the grid by a subsampled query grid with no skip; {_NOT_MAPPED}"
    ),
    "MultiScaleVit": f"its pooling attention pools queries, keys and values inside every attention; {_NOT_MAPPED}",
    "Hiera": f"its mask-unit attention pools queries inside the attention between stages; {_NOT_MAPPED}",
    "HieraDet": f"its multi-scale attention pools queries inside the attention between stages; {_NOT_MAPPED}",
    "ConVit": (
        "its gated positional self-attention blends content and positional attention and the class token joins after "
        f"those layers; {_NOT_MAPPED}"
    ),
    "GlobalContextVit": f"its window attention reads global queries made by a CNN branch, not by tokens; {_NOT_MAPPED}",
    "MaxxVit": f"it interleaves MBConv blocks with window and dilated-grid attention on feature maps; {_NOT_MAPPED}",
    "MetaFormer": f"its early stages mix tokens by convolution or pooling, attention only later; {_NOT_MAPPED}",
    "EfficientFormer": f"its attention runs only in the last stage, after pooling token mixers; {_NOT_MAPPED}",
    "EfficientFormerV2": f"it mixes convolution with feature-map and strided-query attention; {_NOT_MAPPED}",
    "FastVit": f"its convolutional RepMixer token mixers precede attention in the last stage; {_NOT_MAPPED}",
    "NextViT": f"it interleaves convolution blocks with spatial-reduction attention on feature maps; {_NOT_MAPPED}",
    "TinyVit": f"its window attention blocks carry a local convolution and follow a convolution stage; {_NOT_MAPPED}",
    "Visformer": f"its attention runs on convolutional feature maps after convolution stages; {_NOT_MAPPED}",
    "SHViT": f"its single-head attention runs on a channel subset of convolutional feature maps; {_NOT_MAPPED}",
    "CPUBone": f"its convolutional attention runs inside a hybrid CNN on feature maps; {_NOT_MAPPED}",
    "LowFormer": f"its convolutional attention runs inside a hybrid CNN on downsampled feature maps; {_NOT_MAPPED}",
    "IFormer": f"its single-head modulation attention runs inside a hybrid CNN on feature maps; {_NOT_MAPPED}",
    "CSATv2": f"its attention runs on DCT-compressed feature maps of a hybrid CNN; {_NOT_MAPPED}",
    "MobileNetV5": f"its multi-query attention runs on CNN feature maps with downsampled keys; {_NOT_MAPPED}",
    "Qwen3VitClassifier": f"it is a vision-language encoder that merges patches for its language model; {_NOT_MAPPED}",
    "Gemma4VitClassifier": f"it is a vision-language encoder with a pooling head of its own; {_NOT_MAPPED}",
    "DeepseekVitClassifier": f"it is a vision-language encoder with an aligner head of its own; {_NOT_MAPPED}",
}
"""Model classes whose attention has no token rollout (or is not mapped), with the reason; a subclass (a distilled
variant) gets its base class's reason."""

NO_ATTENTION_REASONS: dict[str, str] = {
    "FastVit": "its token mixers are all convolutional (RepMixer), with no attention, so there is nothing to roll out",
    "MetaFormer": (
        "its token mixers are all pooling or convolutions (PoolFormer, ConvFormer), with no attention, so there is "
        "nothing to roll out"
    ),
}
"""Model classes whose variants differ: without any attention module (``fastvit_t8``, ``poolformer_s12``) they get
this reason, with attention (``fastvit_sa12``, ``caformer_s18``) the one in `MODEL_REASONS`."""

MODULE_REASONS.update(
    {
        # Self-attention inside a CNN (timm's ByobNet hosts these, and plain CNNs): no patch-token sequence.
        "BottleneckAttn": "its bottleneck self-attention runs on CNN feature maps inside a ResNet; " + _NOT_MAPPED,
        "HaloAttn": "its halo self-attention runs on CNN feature maps inside a ResNet; " + _NOT_MAPPED,
        "LambdaLayer": "its lambda layers summarise context into linear maps, with no token-to-token attention matrix",
        "MobileVitBlock": "its transformer attends across unfolded patches of CNN feature maps; " + _NOT_MAPPED,
        "MobileVitV2Block": "its separable linear self-attention has no token-to-token attention matrix to roll out",
        "MobileAttention": "its multi-query attention runs on CNN feature maps (MobileNetV4 hybrid); " + _NOT_MAPPED,
    }
)


def _has_attention(model: nn.Module) -> bool:
    return any("Attention" in type(module).__name__ for module in model.modules())


def refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be rolled out, or ``None`` when nothing known prevents it."""
    name = type(model).__name__
    if name in NO_ATTENTION_REASONS and not _has_attention(model):
        return NO_ATTENTION_REASONS[name]
    for cls in type(model).__mro__:
        reason = MODEL_REASONS.get(cls.__name__)
        if reason is not None:
            return reason
    for module in model.modules():
        reason = MODULE_REASONS.get(type(module).__name__)
        if reason is not None:
            return reason
    return None
