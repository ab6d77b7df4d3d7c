"""Real DDP with 2 CPU processes (gloo): rank 0 explains without collectives, heads are pruned on every rank alike, and
nothing hangs or desynchronises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import VisionTransformer

from tests.lightning_helpers import tiny_data
from tests.scripts import run_ranks_script

# Two real DDP processes.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("processes")]

SCRIPT = Path(__file__).with_name("ddp_script.py")
PRUNING_SCRIPT = Path(__file__).with_name("ddp_pruning_script.py")


def run_ranks(tmp_path: Path, *arguments: str) -> tuple[dict, dict]:
    """Run the 2-process DDP fit; each rank's report."""
    run_ranks_script([sys.executable, str(SCRIPT), str(tmp_path), *arguments], "DDP fit")
    return json.loads((tmp_path / "rank0.json").read_text()), json.loads((tmp_path / "rank1.json").read_text())


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(tmp_path)
    assert rank0["world_size"] == rank1["world_size"] == 2
    # Only rank 0 explains and keeps a trajectory; the other rank never took a probe.
    assert rank0["trajectory_epochs"] == [0, 1] and rank0["has_probe"]
    assert rank1["trajectory_epochs"] == [] and not rank1["has_probe"]
    # The probe is the first samples of the validation set, as on one device, not rank 0's shard (0, 2, 4, ...).
    first_samples = torch.stack([tiny_data(num_train=64, num_val=32, batch_size=8).val_dataset[i][0] for i in range(4)])
    assert torch.tensor(rank0["probe_images"]).equal(first_samples.double().flatten())
    # Both ranks end with the same weights: no desynchronisation.
    assert rank0["weights_sum"] == rank1["weights_sum"]
    assert rank0["weights_abs_sum"] == rank1["weights_abs_sum"]
    events = EventAccumulator(rank0["log_dir"], size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    assert len(events.Images("gmar/overlay/gmar_l1")) == 2
    assert len(events.Histograms("gmar/head_weights/layer_00")) == 2
    assert (Path(rank0["log_dir"]) / "head_importance.npz").exists()


def masked_reference(state_dict: dict[str, torch.Tensor]) -> VisionTransformer:
    """The unpruned TinyViT with the pruned weights back in their heads' slots and removed heads contributing nothing:
    their ``proj`` input columns are zero (and their q/k/v rows, which then cannot matter)."""
    reference = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4)
    full = reference.state_dict()
    for key, value in state_dict.items():
        key = key.removeprefix("vit.")
        if key.endswith("kept_heads"):
            continue
        if key.endswith(("qkv.weight", "qkv.bias", "proj.weight")) and ".attn." in key:
            kept = state_dict["vit." + key.rsplit(".", 2)[0] + ".kept_heads"]
            channels = torch.cat([torch.arange(head * 8, head * 8 + 8) for head in kept.nonzero().flatten().tolist()])
            slot = torch.zeros_like(full[key])
            if key.endswith("proj.weight"):
                slot[:, channels] = value
            else:
                rows = torch.cat([channels + part * 32 for part in range(3)])
                slot[rows] = value
            full[key] = slot
        else:
            full[key] = value
    reference.load_state_dict(full)
    return reference.eval()


def test_ddp_head_pruning_keeps_the_ranks_identical(tmp_path: Path) -> None:
    run_ranks_script([sys.executable, str(PRUNING_SCRIPT), str(tmp_path)], "DDP fit with HeadPruning")
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    saved = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # Both ranks removed the same heads at the same step (rank 0 ranked them on its GMAR trajectory) ...
    assert reports[0]["history"] == reports[1]["history"] and len(reports[0]["history"]) == 1
    assert sum(len(heads) for heads in reports[0]["history"][0]["removed"].values()) == 3
    # ... went on training the new parameters with the optimizer ...
    assert all(report["optimizer_holds_the_model_parameters"] for report in reports)
    # ... and hold bit-identical weights after two more epochs on different data shards: DDP's new buckets reduced
    # the new parameters' gradients.
    assert saved[0]["state_dict"].keys() == saved[1]["state_dict"].keys()
    assert all(torch.equal(saved[0]["state_dict"][key], saved[1]["state_dict"][key]) for key in saved[0]["state_dict"])
    # The pruned model computes what the unpruned architecture computes with those heads masked.
    with torch.no_grad():
        masked = masked_reference(saved[0]["state_dict"])(saved[0]["images"])
    assert torch.allclose(saved[0]["logits"], masked, atol=1e-5)


def test_every_rank_explains_in_lockstep_when_asked(tmp_path: Path) -> None:
    # The path FSDP, FSDP2 and DeepSpeed take (their forward gathers shards with collectives), run here under DDP.
    rank0, rank1 = run_ranks(tmp_path, "all_ranks")
    assert rank0["trajectory_epochs"] == rank1["trajectory_epochs"] == [0, 1]
    assert rank0["probe_images"] == rank1["probe_images"] and rank0["has_probe"]
    # The same probe and weights on every rank: the same head weights and maps.
    assert rank0["head_weights"] == rank1["head_weights"] and rank0["head_weights"]
    assert rank0["maps"] == rank1["maps"] and set(rank0["maps"]) == {"gmar_l1", "rollout"}
    assert rank0["weights_sum"] == rank1["weights_sum"]
    # Rank 0 logs each evaluation once.
    events = EventAccumulator(rank0["log_dir"], size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    assert len(events.Images("gmar/overlay/gmar_l1")) == 2


def test_explain_on_all_ranks_must_be_a_bool_or_none() -> None:
    from gmar_lightning import GMARCallback

    with pytest.raises(TypeError, match=r"`explain_on_all_ranks` must be True, False or None, got 'yes'"):
        GMARCallback(explain_on_all_ranks="yes")
