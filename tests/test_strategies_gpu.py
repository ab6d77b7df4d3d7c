"""GMARCallback under Lightning's sharded strategies, which need CUDA: FSDPStrategy, ModelParallelStrategy (FSDP2)
and DeepSpeedStrategy (ZeRO-3). Every rank explains in lockstep; the logged maps equal the unsharded model's.

Skipped without CUDA (DeepSpeed also without the ``deepspeed`` package); ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from gmar_lightning import GMARCallback, explain
from tests.lightning_helpers import TinyViTModule, tiny_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's sharded strategies need a CUDA device"),
]


class ShardedTinyViT(TinyViTModule):
    """The tiny ViT, sharded with FSDP2 (``fully_shard``) per block and at the root by ModelParallelStrategy."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.vit.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.vit, mesh=mesh)


def strategies() -> list:
    cases = [
        pytest.param(lambda: FSDPStrategy(), TinyViTModule, id="fsdp"),
        pytest.param(
            lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), ShardedTinyViT, id="fsdp2"
        ),
    ]
    deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
    cases.append(pytest.param(lambda: DeepSpeedStrategy(stage=3), TinyViTModule, id="deepspeed3", marks=deepspeed))
    return cases


@pytest.mark.parametrize(("make_strategy", "module_class"), strategies())
def test_callback_maps_equal_the_unsharded_models(make_strategy, module_class, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    callback = GMARCallback(probe=images, methods=("gmar_l1", "grad_rollout"), on_error="raise")
    trainer = pl.Trainer(
        strategy=make_strategy(),
        accelerator="cuda",
        devices=1,
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    module = module_class()
    trainer.fit(module, datamodule=tiny_data())
    assert callback.trajectory.epochs == [0]
    # The unsharded model with the trained weights, explained directly.
    state = trainer.strategy.lightning_module_state_dict()
    unsharded = TinyViTModule()
    # FSDP2 may hand back sharded DTensors: gather each into the full tensor.
    full = {key: getattr(value, "full_tensor", lambda value=value: value)().cpu() for key, value in state.items()}
    unsharded.load_state_dict(full)
    for method, logged in callback.map_history.maps.items():
        expected = explain(unsharded.vit, images, method=method).maps
        quantised = (expected.clamp(0, 1) * 255).round().to(logged.dtype)
        assert (quantised.int() - logged[-1].int()).abs().max() <= 1, method  # uint8 maps: one level of rounding
