"""Head pruning of Hugging Face transformers ViTs: exact against masking (eager and SDPA attention), costs, refusals,
state dicts, explain and a HeadPruning fit with GMARCallback.

The masked reference zeroes ``o_proj``'s input columns of the dropped heads on a copy of the model, written here
independently of ``gmar_lightning.heads``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if transformers.__version__.startswith("4."):
    pytest.skip("prune_heads supports the transformers 5 attention layout", allow_module_level=True)

from gmar_lightning import GMARCallback, HeadPruning, explain  # noqa: E402
from gmar_lightning.heads import head_mask, michel_importance  # noqa: E402
from gmar_lightning.heads.pruning import (  # noqa: E402
    head_counts,
    head_ids,
    prune_heads,
    pruning_spec,
    restore_pruning,
    weight_magnitude_importance,
)
from gmar_lightning.trajectory import HeadTrajectory  # noqa: E402
from tests.lightning_helpers import tiny_data, trainer_kwargs  # noqa: E402
from tests.reference import zeroed_output_columns  # noqa: E402
from tests.test_hf import HFViTModule  # noqa: E402  (a 2-layer, 4-head ViTForImageClassification for 4 classes)

DIM, LAYERS, HEADS, HEAD_DIM = 32, 3, 4, 8
TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": DIM,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": 64,
    "num_labels": 5,
}
CASES: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)),
    "deit_with_teacher": lambda: transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY)),
    "beit_rel_pos": lambda: transformers.BeitForImageClassification(
        transformers.BeitConfig(use_relative_position_bias=True, layer_scale_init_value=0.5, **TINY)
    ),
    "dinov2": lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**TINY)),
    "dinov2_registers": lambda: transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **TINY)
    ),
}
# Ragged on purpose: 2, 4 and 1 heads remain.
KEEP = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


def make(case: str, implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A tiny random model with large weights and non-zero biases and tokens, so slicing mistakes show."""
    torch.manual_seed(seed)
    model = CASES[case]()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.config._attn_implementation = implementation
    return model.eval()


def attentions(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "o_proj") and hasattr(module, "q_proj")]


def zeroed_o_proj_columns(model: nn.Module, keep: Tensor) -> nn.Module:
    """Reference masking: zero ``o_proj``'s input columns of the dropped heads on a copy."""
    reference = copy.deepcopy(model)
    zeroed_output_columns(attentions(reference), keep, HEAD_DIM, "o_proj")
    return reference


def logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model(pixel_values=images).logits


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_pruned_model_equals_masked_model(case: str, implementation: str) -> None:
    model = make(case, implementation)
    masked = zeroed_o_proj_columns(model, KEEP)
    with head_mask(model, KEEP):  # the package's masking agrees with the reference
        assert torch.allclose(logits(model, IMAGES), logits(masked, IMAGES), atol=1e-5)
    prune_heads(model, KEEP)
    assert head_counts(model) == [2, 4, 1]
    assert [ids.tolist() for ids in head_ids(model)] == [[0, 2], [0, 1, 2, 3], [2]]
    assert [module.num_attention_heads for module in attentions(model)] == [2, 4, 1]
    assert attentions(model)[0].q_proj.weight.shape == (2 * HEAD_DIM, DIM)
    assert attentions(model)[0].o_proj.weight.shape == (DIM, 2 * HEAD_DIM)
    assert model.config._attn_implementation == implementation
    expected = logits(masked, IMAGES)
    assert torch.allclose(logits(model, IMAGES), expected, atol=1e-5)
    model.config._attn_implementation = "eager" if implementation == "sdpa" else "sdpa"
    assert torch.allclose(logits(model, IMAGES), expected, atol=1e-5)
    assert not torch.allclose(logits(make(case), IMAGES), expected, atol=1e-3)  # the heads did matter


def test_beit_relative_position_tables_lose_the_removed_heads_columns() -> None:
    model = make("beit_rel_pos")
    tables = [layer.relative_position_bias.relative_position_bias_table for layer in model.beit.layers]
    prune_heads(model, KEEP)
    for layer, table, row in zip(model.beit.layers, tables, KEEP, strict=True):
        assert torch.equal(layer.relative_position_bias.relative_position_bias_table, table[:, row.bool()])


def test_parameters_drop_by_the_per_head_cost() -> None:
    model = make("vit")
    before = sum(p.numel() for p in model.parameters())
    prune_heads(model, KEEP)
    removed = int((KEEP == 0).sum())
    # Per head: q, k, v rows (D x d each, with biases) and o_proj columns (D x d).
    assert before - sum(p.numel() for p in model.parameters()) == removed * (4 * DIM * HEAD_DIM + 3 * HEAD_DIM)


def test_pruning_in_steps_equals_pruning_at_once() -> None:
    at_once, in_steps = make("dinov2"), make("dinov2")
    prune_heads(at_once, KEEP)
    prune_heads(in_steps, {0: [3], 2: [0, 1]})
    prune_heads(in_steps, {0: [1], 2: [3]})
    assert (
        pruning_spec(in_steps)
        == pruning_spec(at_once)
        == {
            "dinov2.encoder.layer.0.attention": [1, 3],
            "dinov2.encoder.layer.2.attention": [0, 1, 3],
        }
    )
    assert torch.equal(logits(in_steps, IMAGES), logits(at_once, IMAGES))


def test_removing_every_head_of_a_layer_is_refused_before_anything_changes() -> None:
    model = make("vit")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^`heads` removes every head of layer `vit\.layers\.2\.attention`, which"):
        prune_heads(model, {0: [0], 2: [0, 1, 2, 3]})
    assert head_counts(model) == [4, 4, 4]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_a_relative_position_bias_shared_by_all_layers_is_refused() -> None:
    config = transformers.BeitConfig(use_shared_relative_position_bias=True, **TINY)
    model = transformers.BeitForImageClassification(config).eval()
    with pytest.raises(ValueError, match=r"^`heads`: layer `beit\.layers\.0\.attention` adds a relative-pos"):
        prune_heads(model, {0: [1]})
    assert head_counts(model) == [4, 4, 4]


@pytest.mark.parametrize("case", ["vit", "beit_rel_pos"])
def test_state_dict_carries_the_spec_and_restores_into_a_fresh_model(case: str, tmp_path: Path) -> None:
    model = make(case)
    prune_heads(model, KEEP)
    path = tmp_path / "pruned.pth"
    torch.save(model.state_dict(), path)
    fresh = CASES[case]().eval()
    state = torch.load(path, weights_only=True)
    restore_pruning(fresh, state)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(logits(fresh, IMAGES), logits(model, IMAGES))
    prefixed = CASES[case]().eval()  # a Lightning-style prefix is found as well
    restore_pruning(prefixed, {f"model.{key}": value for key, value in state.items()})
    assert head_counts(prefixed) == [2, 4, 1]


def test_weight_magnitude_importance_reads_q_k_v_rows_and_o_proj_columns() -> None:
    model = make("vit")
    prune_heads(model, {0: [1]})
    importance = weight_magnitude_importance(model)
    attention = attentions(model)[0]
    position, head = 1, 2  # head 2 sits at position 1 of layer 0 now
    rows = slice(position * HEAD_DIM, (position + 1) * HEAD_DIM)
    squares = sum(getattr(attention, name).weight[rows].square().sum() for name in ("q_proj", "k_proj", "v_proj"))
    squares = squares + attention.o_proj.weight[:, rows].square().sum()
    assert torch.isclose(importance[0, head], squares.sqrt())
    assert importance[0, 1].isnan() and not importance[1:].isnan().any()


@pytest.mark.parametrize("case", ["vit", "deit_with_teacher", "dinov2_registers"])
def test_explain_a_pruned_model_equals_explaining_the_masked_model(case: str) -> None:
    # A zeroed head gets no gradient, so its GMAR weight is 0 and the other heads' weights and the maps are those of
    # the pruned model, where the head is NaN (missing) instead.
    model = make(case)
    masked = zeroed_o_proj_columns(model, KEEP)
    prune_heads(model, KEEP)
    pruned, reference = (explain(m, IMAGES, method="gmar_l1") for m in (model, masked))
    assert torch.allclose(pruned.token_maps, reference.token_maps, atol=1e-5)
    missing = KEEP == 0
    assert pruned.head_weights[:, missing].isnan().all()
    assert torch.allclose(pruned.head_weights[:, ~missing], reference.head_weights[:, ~missing], atol=1e-6)
    assert model.config._attn_implementation == "sdpa"
    labels = torch.tensor([0, 3, 1])
    importance = michel_importance(model, [(IMAGES, labels)], normalize_per_layer=False, progress=False)
    expected = michel_importance(masked, [(IMAGES, labels)], normalize_per_layer=False, progress=False)
    assert importance[missing].isnan().all()
    assert torch.allclose(importance[~missing], expected[~missing], atol=1e-6)


@pytest.mark.integration
def test_head_pruning_with_gmar_callback_then_resume(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = HFViTModule()
    gmar = GMARCallback(num_probe=4, methods=("gmar_l1",))
    pruning = HeadPruning(amount=3, criterion="gmar", epochs=[1], gmar_last_n=1, throughput_batch=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[gmar, pruning, checkpoint]))
    trainer.fit(module, datamodule=tiny_data())

    assert sum(head_counts(module.model)) == 8 - 3 and min(head_counts(module.model)) >= 1
    entry = pruning.history[0]
    weights = gmar.trajectory.weights[0]
    removed = [(int(name.split(".")[2]), head) for name, heads in entry["removed"].items() for head in heads]
    kept = [(layer, head) for layer in range(2) for head in range(4) if (layer, head) not in removed]
    assert max(weights[layer, head] for layer, head in removed) <= min(weights[layer, head] for layer, head in kept)
    assert entry["parameters"] == entry["parameters_before"] - 3 * (4 * DIM * HEAD_DIM + 3 * HEAD_DIM)
    assert entry["speedup"] > 0
    assert json.loads((Path(logger.log_dir) / "head_pruning.json").read_text()) == pruning.history
    # GMARCallback went on explaining the pruned model: the removed heads are NaN at epoch 1, the rest sum to one.
    trajectory = HeadTrajectory.load_npz(Path(logger.log_dir) / "head_importance.npz")
    assert trajectory.epochs == [0, 1] and int(trajectory.weights[1].isnan().sum()) == 3
    assert torch.allclose(trajectory.weights[1].nansum(-1), torch.ones(2))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    assert [event.value for event in events.Scalars("head_pruning/heads")] == [8.0, 5.0]

    # A fresh module resumes the pruned checkpoint: pruned to match, weights loaded, training goes on.
    resumed = HFViTModule()
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=3, logger=False, callbacks=[HeadPruning(criterion="magnitude", epochs=[])]
        )
    )
    trainer.fit(resumed, datamodule=tiny_data(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert head_counts(resumed.model) == head_counts(module.model)
    assert trainer.current_epoch == 3


def test_head_pruning_refuses_to_empty_layers_of_a_transformers_vit(tmp_path: Path) -> None:
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False))
    pruning = HeadPruning(criterion="magnitude", min_heads_per_layer=0)
    with pytest.raises(ValueError, match=r"^`min_heads_per_layer=0` may empty a layer, which transformers attention"):
        pruning.setup(trainer, HFViTModule(), "fit")
