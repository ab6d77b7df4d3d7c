"""Prune attention heads in GMAR order: compare orders by masking, then remove heads for real and save the model.

Reads a run's ``head_importance.npz`` (written by GMARCallback at the end of fit) and the run's checkpoint, ranks the
heads by their GMAR weight at the last epoch, and measures validation accuracy as more and more heads are masked in
four orders: GMAR least important first, GMAR most important first, Michel et al. (2019) least important first,
and a seeded random order. If GMAR's weights mean something, removing the least important heads first hurts much
less than removing the most important first. Writes ``ablation.png``, ``ranking.json`` and one CSV per curve.

Then it removes ``--prune-fraction`` of the heads, GMAR least important first, from the model for real
(``prune_heads``), and recovers with the recipe ``benchmarks/pruning.py`` chose: the heads go in ``--prune-steps``
(2) equal steps, each followed by ``--recovery-epochs`` (3) of fine-tuning on the run's training data (AdamW at a
peak learning rate of 5e-4 with warm-up and cosine decay, cross-entropy; ``--distill-alpha`` above 0 distils from the
unpruned model), and before the second step the remaining heads are ranked again by GMAR on a validation batch. The
unpruned model gets the same fine-tunes, the control. It reports validation accuracy before, right after a one-shot
removal, after the recovery and the control's, the parameters and the speed-up (the two models timed in
alternation), and saves the pruned model as
``pruned_model.pth`` (a state dict carrying its pruning spec; ``load_weights`` rebuilds it)::

    python examples/finetune_vit.py                      # a run to prune, in runs/gmar_demo/version_0
    python examples/head_pruning.py runs/gmar_demo/version_0
    python examples/head_pruning.py --demo               # train a small model first, then prune it

The checkpoint defaults to ``<run>/checkpoints/last.ckpt``; a model trained by the demo is rebuilt from the settings
stored in it, and its validation split is regenerated from the stored data settings. For other weights pass
``--model``, ``--num-classes`` (and ``--img-size``/``--model-kwargs``) and ``--data-dir`` with a ``val/`` folder.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes every parallel op wait ~8 ms on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gmar_lightning import explain
from gmar_lightning.cli import add_model_arguments
from gmar_lightning.demos.config import DemoConfig
from gmar_lightning.demos.data import ShapesDataModule
from gmar_lightning.demos.image_folder import ImageFolderDataModule
from gmar_lightning.demos.job import run_demo
from gmar_lightning.heads import (
    AblationCurve,
    attention_head_grid,
    distillation_loss,
    head_ablation_curve,
    head_counts,
    mask_from_order,
    measure_speedup,
    michel_importance,
    plot_ablation_curves,
    prune_gradually,
    prune_heads,
    random_order,
    rank_heads,
)
from gmar_lightning.model_loading import checkpoint_model_settings, create_vit
from gmar_lightning.report import find_trajectory
from gmar_lightning.trajectory import HeadTrajectory

FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

# A quick run for --demo: the default small ViT on fewer shapes, long enough for the heads to differ.
DEMO_SETTINGS = {"epochs": 8, "max_train_images": 2000, "max_val_images": 256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=None, help="run directory holding head_importance.npz")
    parser.add_argument("--demo", action="store_true", help="train a small model first and prune that run")
    parser.add_argument("--demo-log-dir", default="runs", help="where --demo logs its run")
    add_model_arguments(parser)
    parser.add_argument("--num-classes", type=int, default=None, help="classes of a non-demo checkpoint")
    parser.add_argument("--data-dir", default=None, help="ImageFolder root with a val/ folder (default: shapes)")
    parser.add_argument("--batch-size", type=int, default=128, help="validation images per batch")
    parser.add_argument("--max-batches", type=int, default=None, help="validation batches per curve (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument("--epoch", choices=("last", "mean"), default="last", help="GMAR weights of which epoch")
    parser.add_argument("--output", default=None, help="output folder (default: <run>/pruning)")
    parser.add_argument("--prune-fraction", type=float, default=0.5, help="fraction of heads removed for real")
    # The recovery recipe of benchmarks/pruning.py, chosen there on tuning seeds: 2 steps, 3 epochs after each.
    parser.add_argument("--prune-steps", type=int, default=2, help="prune in equal steps, each followed by a recovery")
    parser.add_argument("--recovery-epochs", type=int, default=3, help="fine-tuning epochs after each step (0: none)")
    parser.add_argument("--recovery-lr", type=float, default=5e-4, help="peak AdamW learning rate of the recovery")
    parser.add_argument(
        "--distill-alpha", type=float, default=0.0, help="recovery: weight of distillation from the unpruned model"
    )
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="recovery: distillation temperature")
    return parser


def load_model(run_dir: Path, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The trained ViT and the stored data settings of its run (empty when the checkpoint has none)."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"`--checkpoint` {str(checkpoint)!r} does not exist; pass the run's weights file.")
    stored = checkpoint_model_settings(checkpoint) or {}
    model_name = args.model or stored.get("model_name")
    num_classes = args.num_classes or stored.get("num_classes")
    if model_name is None or num_classes is None:
        raise ValueError(
            f"`--checkpoint` {str(checkpoint)!r} stores no model settings; pass --model and --num-classes."
        )
    model = create_vit(
        model_name,
        num_classes,
        img_size=args.img_size or stored.get("img_size"),
        checkpoint_path=checkpoint,
        model_kwargs={**(stored.get("model_kwargs") or {}), **args.model_kwargs},
        strict=True,
    )
    data_settings = {}
    if checkpoint.suffix == ".ckpt":
        data_settings = torch.load(checkpoint, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters")
    return model.eval(), dict(data_settings or {})


def validation_loader(model: nn.Module, data_settings: dict[str, Any], args: argparse.Namespace) -> DataLoader:
    """The run's validation data: the stored shapes split, or ``--data-dir``'s ``val/`` folder."""
    img_size = int(model.patch_embed.img_size[0])
    if args.data_dir is not None:
        config = resolve_model_data_config(model)
        folders = ImageFolderDataModule(
            args.data_dir, img_size, tuple(config["mean"]), tuple(config["std"]), batch_size=args.batch_size
        )
        return folders.val_dataloader()
    settings = {"image_size": img_size, "num_classes": model.num_classes, **data_settings}
    settings["batch_size"] = args.batch_size
    return ShapesDataModule(**settings).val_dataloader()


def training_loader(model: nn.Module, data_settings: dict[str, Any], args: argparse.Namespace) -> DataLoader:
    """The run's training data for the recovery fine-tune: the stored shapes split, or ``--data-dir``'s ``train/``."""
    img_size = int(model.patch_embed.img_size[0])
    if args.data_dir is not None:
        config = resolve_model_data_config(model)
        folders = ImageFolderDataModule(
            args.data_dir, img_size, tuple(config["mean"]), tuple(config["std"]), batch_size=32
        )
        return folders.train_dataloader()
    settings = {"image_size": img_size, "num_classes": model.num_classes, **data_settings, "batch_size": 32}
    return ShapesDataModule(**settings).train_dataloader()


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 validation accuracy, in eval mode."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="accuracy", leave=False):
            correct += int((model(batch[0]).argmax(dim=-1) == batch[1]).sum())
            total += len(batch[1])
    return correct / total


def recover(model: nn.Module, loader: DataLoader, teacher: nn.Module, args: argparse.Namespace) -> None:
    """The recovery fine-tune of ``benchmarks/pruning.py``: AdamW at a peak ``--recovery-lr`` with a linear warm-up over
    the first 10% of the steps and a cosine decay, no weight decay on norms, biases, tokens and position embeddings,
    gradient clipping at 1, and cross-entropy, or with ``--distill-alpha`` above 0 ``distillation_loss`` towards the
    unpruned ``teacher``'s logits."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        skip = parameter.ndim <= 1 or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.recovery_lr
    )
    total_steps = len(loader) * args.recovery_epochs
    warmup_steps = int(0.1 * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    for _ in range(args.recovery_epochs):
        for batch in tqdm(loader, desc="recovery fine-tune", leave=False):
            logits = model(batch[0])
            if args.distill_alpha > 0:
                with torch.no_grad():
                    teacher_logits = teacher(batch[0])
                loss = distillation_loss(logits, teacher_logits, batch[1], args.distill_alpha, args.distill_temperature)
            else:
                loss = F.cross_entropy(logits, batch[1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    model.eval()


def prune_for_real(
    model: nn.Module, order: torch.Tensor, loaders: tuple[DataLoader, DataLoader], args: argparse.Namespace
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the first ``--prune-fraction`` of ``order``'s heads, fine-tune, and measure accuracy and speed.

    With a recovery the heads go in ``--prune-steps`` equal steps (``prune_gradually``), each followed by the recovery
    fine-tune; before each later step the remaining heads are ranked again by their GMAR weights on a validation batch.
    """
    train_loader, val_loader = loaders
    num_layers, num_heads = attention_head_grid(model)
    count = round(args.prune_fraction * num_layers * num_heads)
    images, labels = next(iter(val_loader))[:2]
    pruned = copy.deepcopy(model)
    prune_heads(pruned, mask_from_order(order, count, num_layers, num_heads))
    summary = {
        "heads_removed": count,
        "parameters_before": sum(p.numel() for p in model.parameters()),
        "accuracy_before": accuracy(model, val_loader),
        "accuracy_pruned": accuracy(pruned, val_loader),
    }
    if args.recovery_epochs:
        ranks = torch.empty(num_layers, num_heads)  # the run's GMAR order as scores: earlier = less important
        ranks[order[:, 0], order[:, 1]] = torch.arange(len(order), dtype=ranks.dtype)

        def importance(current: nn.Module) -> torch.Tensor:
            if sum(head_counts(current)) == num_layers * num_heads:
                return ranks
            return explain(current, images, method="gmar_l1", target=labels).head_weights.mean(dim=0)

        pruned = copy.deepcopy(model)
        prune_gradually(
            pruned, count, args.prune_steps, importance, lambda current: recover(current, train_loader, model, args)
        )
        # The control: the unpruned model given the same fine-tunes, so "lost" compares like with like.
        control = copy.deepcopy(model)
        for _ in range(args.prune_steps):
            recover(control, train_loader, model, args)
        summary["accuracy_unpruned_recovered"] = accuracy(control, val_loader)
    summary["heads_per_layer"] = head_counts(pruned)
    summary["parameters_after"] = sum(p.numel() for p in pruned.parameters())
    summary["accuracy_recovered"] = accuracy(pruned, val_loader)
    # Timed in alternation, so load from other processes slows both models alike: a ratio, never a raw speed.
    summary["speedup"] = measure_speedup(model, pruned, images, rounds=11)
    return pruned, summary


def ablate(trajectory: HeadTrajectory, model: nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict:
    """Rank heads four ways and trace an ablation curve for each; returns the JSON-ready ranking."""
    epoch = -1 if args.epoch == "last" else "mean"
    num_layers, num_heads = attention_head_grid(model)
    if trajectory.weights.shape[1:] != (num_layers, num_heads):
        raise ValueError(
            f"`run` head weights are {list(trajectory.weights.shape[1:])} but the model has [{num_layers}, "
            f"{num_heads}] heads; pass the checkpoint of the same run."
        )
    michel = michel_importance(model, loader, max_batches=args.max_batches)
    orders = {
        "gmar_least_important_first": rank_heads(trajectory, least_important_first=True, epoch=epoch),
        "gmar_most_important_first": rank_heads(trajectory, least_important_first=False, epoch=epoch),
        "michel_least_important_first": rank_heads(michel, least_important_first=True),
        f"random_seed{args.seed}": random_order(num_layers, num_heads, seed=args.seed),
    }
    curves: list[AblationCurve] = [
        head_ablation_curve(model, loader, order, FRACTIONS, order_name=name, max_batches=args.max_batches)
        for name, order in orders.items()
    ]
    gmar_weights = trajectory.weights[-1] if epoch == -1 else trajectory.weights.mean(dim=0)
    return {
        "layer_names": trajectory.layer_names,
        "gmar_epoch": trajectory.epochs[-1] if epoch == -1 else "mean",
        "gmar_head_weights": gmar_weights.tolist(),
        "michel_importance": michel.tolist(),
        "orders": {name: order.tolist() for name, order in orders.items()},
        "curves": {curve.order_name: curve.to_dict() for curve in curves},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prune a run's heads; returns ``{"ranking", "plot_path", "ranking_path", "pruned"}`` (``pruned``: the summary of
    the model pruned for real, also in ``pruned_model.json``)."""
    args = build_parser().parse_args(argv)
    if args.demo:
        result = run_demo(DemoConfig(log_dir=args.demo_log_dir, **DEMO_SETTINGS))
        run_dir = Path(result["log_dir"])
    elif args.run is None:
        raise ValueError("`run` is required: pass a run directory of a fit with GMARCallback, or --demo.")
    else:
        run_dir = Path(args.run)
    trajectory_path = find_trajectory(run_dir)
    run_dir = trajectory_path.parent
    trajectory = HeadTrajectory.load_npz(trajectory_path)
    if not len(trajectory):
        raise ValueError(f"`run` {str(trajectory_path)!r} records no epoch; let the fit validate at least once.")
    model, data_settings = load_model(run_dir, args)
    val_loader = validation_loader(model, data_settings, args)
    ranking = ablate(trajectory, model, val_loader, args)
    output = Path(args.output) if args.output else run_dir / "pruning"
    output.mkdir(parents=True, exist_ok=True)
    curves = [AblationCurve.from_dict(curve) for curve in ranking["curves"].values()]
    plot_ablation_curves(curves, path=output / "ablation.png")
    for curve in curves:
        curve.save_csv(output / f"ablation_{curve.order_name}.csv")
    ranking_path = output / "ranking.json"
    ranking_path.write_text(json.dumps(ranking, indent=2) + "\n", encoding="utf-8")
    for curve in curves:
        accuracy = ", ".join(f"{value:.2f}" for value in curve.accuracy)
        print(f"{curve.order_name:>30}: accuracy {accuracy}")
    print(f"Wrote {output / 'ablation.png'} and {ranking_path}")

    order = torch.tensor(ranking["orders"]["gmar_least_important_first"])
    loaders = (training_loader(model, data_settings, args), val_loader)
    pruned, summary = prune_for_real(model, order, loaders, args)
    model_path = output / "pruned_model.pth"
    torch.save(pruned.state_dict(), model_path)
    summary["path"] = str(model_path)
    (output / "pruned_model.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"Removed {summary['heads_removed']} heads (GMAR, least important first); heads per layer "
        f"{summary['heads_per_layer']}, parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,}"
    )
    recovered = f"{summary['accuracy_recovered']:.3f} after {args.prune_steps} step(s) of {args.recovery_epochs} "
    if args.recovery_epochs:
        recovered += f"recovery epoch(s) (unpruned, same fine-tunes: {summary['accuracy_unpruned_recovered']:.3f})"
    else:
        recovered += "recovery epochs"
    print(
        f"Validation accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_pruned']:.3f} as pruned -> "
        f"{recovered}; inference {summary['speedup']:.2f}x as fast (median of 11 interleaved rounds, batch "
        f"{len(next(iter(val_loader))[0])})"
    )
    print(f"Saved the pruned model to {model_path} (load it with gmar_lightning.model_loading.load_weights)")
    return {
        "ranking": ranking,
        "plot_path": str(output / "ablation.png"),
        "ranking_path": str(ranking_path),
        "pruned": summary,
    }


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"head_pruning.py: error: {error}", file=sys.stderr)
        sys.exit(2)
