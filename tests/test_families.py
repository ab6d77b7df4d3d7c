"""Hierarchical and windowed families against the full-matrix reference, with every map written out here.

The global token-mixing matrix of each windowed layer is built by running the model's own roll, pad and window
partition on a grid of token indices; merge maps are written as dense matrices. Nothing here calls the package's
token-plan or grid helpers.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from packaging.version import Version
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gmar_lightning import METHODS, explain
from tests.models import TINY, make_images, sharpen
from tests.reference import Layer, reference_explain

ATOL = 1e-5

SWIN = {"embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4, "num_classes": 5}
SWIN_FIT = {"embed_dim": 16, "depths": (2, 1), "num_heads": (1, 2), "window_size": 4}
SWIN_MODELS = {
    # 40 px / 4 = a 10x10 grid: windows of 4 need padding, and the second block of each stage shifts by 2.
    "swin": ("swin_tiny_patch4_window7_224", 40),
    "swin_v2": ("swinv2_tiny_window8_256", 40),
    "swin_v2_cr": ("swinv2_cr_tiny_ns_224", 32),
}


def window_slots(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """``[W, n]`` token index per window slot (-1: padding), from the same roll, pad and partition as the model."""
    height, width = grid
    index = torch.arange(height * width, dtype=torch.float32).view(1, height, width, 1)
    if any(shift):
        index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (-height) % window[0], (-width) % window[1]
    index = nn.functional.pad(index, (0, 0, 0, pad_w, 0, pad_h), value=-1.0)
    _, padded_h, padded_w, _ = index.shape
    windows = index.view(padded_h // window[0], window[0], padded_w // window[1], window[1])
    return windows.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1]).long()


def windows_to_global(slots: Tensor, num_tokens: int):
    def to_global(captured: Tensor) -> Tensor:
        slots_here = slots.to(captured.device)
        num_windows = slots_here.shape[0]
        per_window = captured.unflatten(0, (-1, num_windows)).transpose(1, 2)  # [B, H, W, n, n]
        batch, heads = per_window.shape[:2]
        present = slots_here >= 0
        window, query_slot, key_slot = (present[:, :, None] & present[:, None, :]).nonzero(as_tuple=True)
        full = captured.new_zeros(batch, heads, num_tokens, num_tokens)
        # Each (query token, key token) pair lies in at most one window; padding slots reach no token.
        queries, keys = slots_here[window, query_slot], slots_here[window, key_slot]
        full[:, :, queries, keys] = per_window[..., window, query_slot, key_slot]
        return full

    return to_global


def coverage(cells: Tensor) -> Tensor:
    """Relevance across a map between grids (docs/method.md): old token ``j`` gets the mean of the new tokens whose
    cells (the non-zero entries of its column) hold it, times ``n_new / n_covered``; tokens in no cell get nothing."""
    members = (cells > 0).float()
    counts = members.sum(dim=0)
    return members / counts.clamp_min(1) * (cells.shape[0] / (counts > 0).sum())


def merge_matrix(grid: tuple[int, int]) -> Tensor:
    """Dense ``[N_new, N_old]``: each merged token is made from its 2x2 children inside the grid, relevance flows back
    by `coverage`."""
    height, width = grid
    new_h, new_w = math.ceil(height / 2), math.ceil(width / 2)
    matrix = torch.zeros(new_h * new_w, height * width)
    for i in range(new_h):
        for j in range(new_w):
            children = [(a, b) for a in (2 * i, 2 * i + 1) for b in (2 * j, 2 * j + 1) if a < height and b < width]
            for a, b in children:
                matrix[i * new_w + j, a * width + b] = 1.0 / len(children)
    return coverage(matrix)


def swin_structure(model: nn.Module, grid: tuple[int, int]) -> tuple[list, tuple[int, int]]:
    stages = model.layers if hasattr(model, "layers") else model.stages
    structure: list = []
    for stage_index, stage in enumerate(stages):
        if stage_index > 0:
            structure.append(merge_matrix(grid))
            grid = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        for block in stage.blocks:
            slots = window_slots(grid, tuple(block.window_size), tuple(block.shift_size))
            structure.append(Layer(windows_to_global(slots, grid[0] * grid[1])))
    return structure, grid


# timm < 1.0.31 builds Swin V2's static shifted-window mask only for grids the windows divide (a 10x10 grid in windows
# of 4 fails inside timm's constructor); its dynamic mask, built from the padded input on each forward, pads on every
# version. So older timm tests the same padded, shifted windows through the dynamic mask.
SWIN_V2_STATIC_MASK_PADS = Version(timm.__version__) >= Version("1.0.31")


def make_swin(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    mask = {} if SWIN_V2_STATIC_MASK_PADS or not name.startswith("swinv2_tiny") else {"strict_img_size": False}
    model = sharpen(timm.create_model(name, img_size=size, **SWIN, **mask)).eval()
    with torch.no_grad():  # Swin V2 zero-initialises its post-norms, which would cut every attention branch off
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
    return model


@pytest.mark.parametrize("family", list(SWIN_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_swin_matches_full_matrix_reference(family: str, method: str, device: torch.device) -> None:
    name, size = SWIN_MODELS[family]
    model = make_swin(name, size).to(device)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    grid = (size // 4, size // 4)
    structure, _ = swin_structure(model, grid)
    shifts = [
        tuple(block.shift_size) for stage in (getattr(model, "layers", None) or model.stages) for block in stage.blocks
    ]
    assert any(any(shift) for shift in shifts), "the test model must have shifted windows"
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=0, readout=None, grid=grid, structure=structure
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("options", [{"head_norm": "global"}, {"start_layer": 2, "residual": 0.3}])
def test_swin_options_match_reference(options: dict, device: torch.device) -> None:
    model = make_swin("swin_tiny_patch4_window7_224", 40).to(device)
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)).to(device)
    structure, _ = swin_structure(model, (10, 10))
    result = explain(model, images, method="gmar_l2", **options)
    expected_maps, expected_weights = reference_explain(
        model, images, "gmar_l2", num_prefix=0, readout=None, grid=(10, 10), structure=structure, **options
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
def test_parallel_branches_are_one_layer_per_block(method: str, device: torch.device) -> None:
    """``x + attn_1(x) + attn_2(x)``: one rollout layer per block, whose heads are both branches' heads."""
    torch.manual_seed(0)
    model = sharpen(timm.create_model("vit_small_patch16_18x2_224", **TINY)).eval().to(device)
    images = make_images("vit").to(device)
    result = explain(model, images, method=method)
    assert result.layer_names == ["blocks.0", "blocks.1", "blocks.2"]
    structure = [Layer(branches=2) for _ in range(TINY["depth"])]
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=1, readout=[0], grid=(4, 4), structure=structure
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        assert result.head_weights.shape == (3, TINY["depth"], 2 * TINY["num_heads"])
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


def pool_matrix(grid: tuple[int, int], kernel: int, stride: int, padding: int = 0, adaptive: int | None = None):
    """Dense ``[N_new, N_old]`` uniform averaging over each output's cell, by pooling one-hot token images."""
    num_tokens = grid[0] * grid[1]
    one_hot = torch.eye(num_tokens).view(num_tokens, 1, *grid)
    if adaptive is not None:
        pooled = nn.functional.adaptive_avg_pool2d(one_hot, adaptive)
    else:
        pooled = nn.functional.avg_pool2d(one_hot, kernel, stride, padding, count_include_pad=False)
    return pooled.reshape(num_tokens, -1).T.contiguous(), tuple(pooled.shape[-2:])


def pooled_keys_to_global(pool: Tensor):
    """Spatial-reduction attention: every token queries pooled keys; a key's attention goes to its cell's tokens."""

    def to_global(captured: Tensor) -> Tensor:
        return captured @ pool.to(captured.device)

    return to_global


def first_conv(conv: nn.Conv2d, size: int) -> tuple[int, int]:
    kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    side = (size + 2 * padding - kernel) // stride + 1
    return side, side


def pyramid_structure(model: nn.Module, size: int) -> tuple[list, tuple[int, int]]:
    """Per stage: the embedding convolution as a map, then each block's global, reduced or windowed attention."""
    twins = hasattr(model, "patch_embeds")
    stages = (
        zip(model.patch_embeds, model.blocks, strict=True)
        if twins
        else [(model.patch_embed if s.downsample is None else s.downsample, s.blocks) for s in model.stages]
    )
    structure, grid, first = [], None, None
    for embed, blocks in stages:
        conv = embed.proj
        if grid is None:
            grid = first = first_conv(conv, size)
        else:
            matrix, grid = pool_matrix(grid, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            structure.append(coverage(matrix))
        for block in blocks:
            attention, num_tokens = block.attn, grid[0] * grid[1]
            if hasattr(attention, "ws"):
                structure.append(Layer(windows_to_global(window_slots(grid, (attention.ws,) * 2, (0, 0)), num_tokens)))
            elif getattr(attention, "pool", None) is not None:
                structure.append(Layer(pooled_keys_to_global(coverage(pool_matrix(grid, 0, 0, adaptive=7)[0]))))
            elif getattr(attention, "sr", None) is not None:
                ratio = attention.sr.kernel_size[0]
                structure.append(Layer(pooled_keys_to_global(coverage(pool_matrix(grid, ratio, ratio)[0]))))
            else:
                structure.append(Layer())
    return structure, first


PYRAMIDS = {
    # 72 px: an 18x18 first grid; 2x2 spatial reduction of odd grids drops the last row and column.
    "pvt_v2": ("pvt_v2_b0", {"embed_dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)}),
    "pvt_v2_li": ("pvt_v2_b2_li", {"embed_dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)}),
    "twins_svt": (
        "twins_svt_small",
        {"embed_dims": (8, 16, 16, 32), "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "wss": (4, 4, 2, 2)},
    ),
    "twins_pcpvt": (
        "twins_pcpvt_small",
        {"embed_dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)},
    ),
}


@pytest.mark.parametrize("family", list(PYRAMIDS))
@pytest.mark.parametrize("method", METHODS)
def test_pyramids_match_full_matrix_reference(family: str, method: str, device: torch.device) -> None:
    name, config = PYRAMIDS[family]
    torch.manual_seed(0)
    model = sharpen(timm.create_model(name, num_classes=5, **config)).eval().to(device)
    images = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1)).to(device)
    structure, grid = pyramid_structure(model, 72)
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=0, readout=None, grid=grid, structure=structure
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


def class_attention_to_global(num_tokens: int):
    """Only the class token (index 0) queries: its row is the captured ``[B, H, 1, N]`` row; other rows are empty."""

    def to_global(captured: Tensor) -> Tensor:
        full = captured.new_zeros(captured.shape[0], captured.shape[1], num_tokens, num_tokens)
        full[:, :, 0, :] = captured[:, :, 0, :]
        return full

    return to_global


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("method", METHODS)
def test_cait_matches_full_matrix_reference(pool: str, method: str, device: torch.device) -> None:
    torch.manual_seed(0)
    model = sharpen(timm.create_model("cait_xxs24_224", global_pool=pool, **TINY)).eval().to(device)
    images = make_images("vit").to(device)
    patches = 16
    # Talking heads: the heads are the softmax distributions, which enter proj_w heads-last.
    inputs = [(block.attn.proj_w, lambda a: a.permute(0, 3, 1, 2)) for block in model.blocks]
    inputs += [(block.attn.attn_drop, lambda a: a) for block in model.blocks_token_only]
    join = torch.cat([torch.zeros(1, patches), torch.eye(patches)])  # the class token comes from no patch
    structure = [Layer() for _ in model.blocks] + [join]
    structure += [Layer(class_attention_to_global(1 + patches), queried=[0]) for _ in model.blocks_token_only]
    readout = [0] if pool == "token" else list(range(1, 1 + patches))
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=0, readout=readout, grid=(4, 4), structure=structure, inputs=inputs
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("name", ["pit_ti_224", "pit_ti_distilled_224"])
@pytest.mark.parametrize("method", METHODS)
def test_pit_matches_full_matrix_reference(name: str, method: str, device: torch.device) -> None:
    torch.manual_seed(0)
    config = {"img_size": 64, "base_dims": [8, 8, 8], "heads": [1, 2, 4], "depth": [2, 1, 1], "num_classes": 5}
    model = sharpen(timm.create_model(name, **config)).eval().to(device)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    prefix = 2 if "distilled" in name else 1
    grid = first = first_conv(model.patch_embed.conv, 64)
    structure: list = []
    for stage in model.transformers:
        if stage.pool is not None:
            conv = stage.pool.conv
            pooled, new_grid = pool_matrix(grid, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            matrix = torch.zeros(prefix + pooled.shape[0], prefix + pooled.shape[1])
            matrix[:prefix, :prefix] = torch.eye(prefix)  # class (and distillation) tokens carry over
            matrix[prefix:, prefix:] = coverage(pooled)
            structure.append(matrix)
            grid = new_grid
        structure += [Layer() for _ in stage.blocks]
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=prefix, readout=list(range(prefix)), grid=first, structure=structure
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
def test_sam_windowed_and_global_blocks_match_full_matrix_reference(method: str, device: torch.device) -> None:
    torch.manual_seed(0)
    config = {"img_size": 40, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 2}
    config |= {"global_attn_indexes": (1, 3), "num_classes": 5, "global_pool": "avg", "neck_chans": 16}
    model = sharpen(timm.create_model("samvit_base_patch16", use_rel_pos=True, **config)).eval().to(device)
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)).to(device)
    grid = (5, 5)  # windows of 2 need padding
    slots = window_slots(grid, (2, 2), (0, 0))
    structure = [Layer(windows_to_global(slots, 25)) if block.window_size else Layer() for block in model.blocks]
    # SAM folds the heads into the batch: [B * W * H, n, n].
    inputs = [(block.attn.attn_drop, lambda a: a.unflatten(0, (-1, 2))) for block in model.blocks]
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(
        model, images, method, num_prefix=0, readout=None, grid=grid, structure=structure, inputs=inputs
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
def test_hybrid_cnn_stem_maps_the_transformer_grid_at_input_size(method: str, device: torch.device) -> None:
    """ResNet stem + ViT: the token grid is the CNN's 4x4 feature map (stride 32 at 128 px); maps come back at 128."""
    torch.manual_seed(0)
    model = sharpen(timm.create_model("vit_tiny_r_s16_p8_224", img_size=128, depth=2, num_classes=5)).eval().to(device)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)).to(device)
    result = explain(model, images, method=method)
    expected_maps, expected_weights = reference_explain(model, images, method, num_prefix=1, readout=[0], grid=(4, 4))
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    assert result.maps.shape == (2, 128, 128)
    if expected_weights is not None:
        torch.testing.assert_close(result.head_weights, expected_weights, rtol=1e-4, atol=ATOL)
    with pytest.raises(ValueError, match="`images` have 1 channels but the model takes 3"):
        explain(model, images[:, :1])


@pytest.mark.integration
def test_callback_on_a_swin_fit_logs_to_tensorboard(tmp_path) -> None:
    """A real fit of a tiny Swin with the callback: overlays, per-layer head histograms and the trajectory read back."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gmar_lightning import GMARCallback
    from tests.lightning_helpers import ClassifierModule, tiny_data, trainer_kwargs

    class TinySwinModule(ClassifierModule):
        def __init__(self) -> None:
            super().__init__()
            # Stage 1: one head, shifted windows of 4 on an 8x8 grid; stage 2: two heads on the merged 4x4 grid.
            self.swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, num_classes=4, **SWIN_FIT)

        def forward(self, images: Tensor) -> Tensor:
            return self.swin(images)

    pl.seed_everything(0, verbose=False)
    callback = GMARCallback(num_probe=8, methods=("gmar_l1", "rollout"), metrics=("pointing_game",))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(TinySwinModule(), datamodule=tiny_data())

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    # GMAR is logged at the step of Lightning's own validation metrics, so the charts line up.
    steps = [event.step for event in events.Scalars("val_loss")]
    assert len(steps) == 2
    for tag in ("gmar/overlay/gmar_l1", "gmar/overlay/rollout", "gmar/head_importance", "gmar/trajectory/layer_00"):
        assert [event.step for event in events.Images(tag)] == steps, tag
    for layer in ("00", "01", "02"):
        assert [event.step for event in events.Histograms(f"gmar/head_weights/layer_{layer}")] == steps
    assert len(events.Scalars("gmar/metrics/gmar_l1/pointing_game")) == 2
    weights = callback.trajectory.weights  # [epochs, layers, H_max]; stage 1 has one head, NaN beyond it
    assert weights.shape == (2, 3, 2)
    assert bool(weights[:, :2, 1].isnan().all()) and not bool(weights[:, 2].isnan().any())
    torch.testing.assert_close(torch.nansum(weights, dim=-1), torch.ones(2, 3))
    history = callback.map_history.maps["gmar_l1"]  # one map per evaluated epoch and kept probe image, input size
    assert history.shape[0] == 2 and tuple(history.shape[-2:]) == (32, 32) and bool(torch.isfinite(history).all())


@pytest.mark.parametrize("method", ["gmar_l1", "rollout"])
def test_swin_discard_ratio_ranks_the_entries_each_window_computes(method: str, device: torch.device) -> None:
    """32 px: an 8x8 grid in whole windows of 4 (no padding), shifted in the second block."""
    torch.manual_seed(0)
    model = sharpen(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, num_classes=5, **SWIN_FIT)).eval()
    model = model.to(device)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    structure, _ = swin_structure(model, (8, 8))
    result = explain(model, images, method=method, discard_ratio=0.4)
    expected_maps, _ = reference_explain(
        model, images, method, num_prefix=0, readout=None, grid=(8, 8), structure=structure, discard_ratio=0.4
    )
    torch.testing.assert_close(result.token_maps, expected_maps, rtol=1e-4, atol=ATOL)
    assert not torch.allclose(result.token_maps, explain(model, images, method=method).token_maps)


def test_swin_refuses_a_pooling_without_read_out_and_a_token_layout() -> None:
    from gmar_lightning import TokenLayout
    from gmar_lightning.families import UnsupportedModelError

    images = torch.randn(1, 3, 32, 32)
    max_pooled = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, **SWIN_FIT)
    # Not global_pool="max" at creation: timm < 1.0.31 asserts 'avg' there but lets reset_classifier set any pooling.
    max_pooled.reset_classifier(max_pooled.num_classes, global_pool="max")
    with pytest.raises(UnsupportedModelError, match=r"\(SwinTransformer\) pools with global_pool='max'.*'avg'"):
        explain(max_pooled, images)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, **SWIN_FIT)
    with pytest.raises(ValueError, match=r"`token_layout` applies to single-sequence ViTs; SwinTransformer"):
        explain(model, images, token_layout=TokenLayout())


class UniformSoftmax(TorchFunctionMode):
    """Every softmax inside the mode returns the uniform distribution over its dimension (still in the graph)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.softmax, Tensor.softmax, nn.functional.softmax):
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            result = result * 0 + 1.0 / result.shape[dim]
        return result


def flat_cases() -> dict:
    pyramid = {"embed_dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "num_classes": 5}
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
    sam = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
    sam |= {"window_size": 2}
    pit = {"img_size": 64, "base_dims": [8, 8, 8], "heads": [1, 2, 4], "depth": [1, 1, 1], "num_classes": 5}
    return {
        # (builder, image size); sizes whose windows and reduction cells need no padding.
        "vit": (lambda: timm.create_model("vit_tiny_patch16_224", **tiny), 32),
        "vit_registers_avg": (lambda: timm.create_model("vit_medium_patch16_reg1_gap_256", **tiny), 32),
        "deit_distilled": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", **tiny), 32),
        "beit": (lambda: timm.create_model("beit_base_patch16_224", **tiny), 32),
        "eva": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=5), 28),
        "siglip_map": (lambda: timm.create_model("vit_base_patch16_siglip_224", **tiny), 32),
        "pe_map": (lambda: timm.create_model("vit_pe_core_base_patch16_224", ref_feat_shape=(4, 4), **tiny), 32),
        "naflex": (
            lambda: timm.create_model("naflexvit_base_patch16_gap", patch_size=8, embed_dim=32, depth=2, num_heads=2),
            32,
        ),
        "hybrid": (lambda: timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=2, num_classes=5), 64),
        "sam": (lambda: timm.create_model("samvit_base_patch16", global_pool="avg", neck_chans=16, **sam), 32),
        "swin": (lambda: make_swin("swin_tiny_patch4_window7_224", 32), 32),
        "swin_v2": (lambda: make_swin("swinv2_tiny_window8_256", 32), 32),
        "swin_v2_cr": (lambda: make_swin("swinv2_cr_tiny_ns_224", 32), 32),
        "pvt_v2": (lambda: timm.create_model("pvt_v2_b0", **pyramid), 64),  # 3x3 stride-2 embeddings overlap
        "pvt_v2_li": (lambda: timm.create_model("pvt_v2_b2_li", **pyramid), 72),  # 7x7 adaptive cells overlap
        "twins_svt": (lambda: timm.create_model("twins_svt_small", **pyramid, wss=(4, 4, 2, 2)), 64),
        "twins_pcpvt": (lambda: timm.create_model("twins_pcpvt_small", **pyramid), 64),
        "cait": (lambda: timm.create_model("cait_xxs24_224", **tiny), 32),
        "pit": (lambda: timm.create_model("pit_ti_224", **pit), 64),  # 3x3 stride-2 pooling overlaps
        "pit_distilled": (lambda: timm.create_model("pit_ti_distilled_224", **pit), 64),
    }


FLAT_CASES = flat_cases()


@pytest.mark.parametrize("family", list(FLAT_CASES))
@pytest.mark.parametrize("method", ["rollout", "gmar_l1"])
def test_uniform_attention_gives_a_flat_map(family: str, method: str) -> None:
    """Overlapping kernels, windows, merges and attention pools add no pattern of their own (max/min <= 1.01)."""
    build, size = FLAT_CASES[family]
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    # The materialised path: the model's own softmax, made uniform, is then the attention every layer uses (the
    # recomputing path derives it from q and k without a softmax call the mode could reach).
    with UniformSoftmax():
        maps = explain(model, images, method=method, recompute_attention=False).token_maps
    assert (maps > 0).all()
    ratio = maps.flatten(1).max(dim=1).values / maps.flatten(1).min(dim=1).values
    assert (ratio <= 1.01).all(), ratio.tolist()
