"""Head-pruning benchmark: accuracy kept and CPU time saved when attention heads are physically removed.

For each training seed the script trains the demo's small ViT (4 layers x 4 heads) from scratch on the synthetic
shapes task, ranks its 16 heads four ways, least important first:

* **GMAR**: mean ``gmar_l1`` head weights over held-out images (target = true label);
* **Michel**: Michel et al. (2019) importance on the same images;
* **magnitude**: the L2 norm of each head's q/k/v rows and ``proj`` columns;
* **random**: a seeded random order;

then physically removes the first ``fraction`` of heads with ``gmar_lightning.heads.pruning.prune_heads`` and
measures validation accuracy as pruned at every fraction, and after a recovery fine-tune at the
``--recovery-fractions`` (the unpruned model gets the same fine-tune, so "accuracy lost" compares like with like).
The recovery can distil from the unpruned model (``--distill-alpha``, ``--distill-temperature``; the unpruned model
then gets the same loss with itself, as it was before the fine-tune, as teacher) and can prune gradually
(``--prune-steps``: equal steps, the heads ranked again by the same order on the pruned model before each step, each
step followed by the fine-tune; the unpruned model gets as many fine-tunes). Recipes are tuned on training seeds
that are not reported: ``--first-seed 100``.
In the same run it times inference of a ViT-S/16-shaped model (224 px, batch 32, random weights) pruned to each
fraction, interleaving the models and taking medians, and compares the measured time saving with the saving its FLOP
count predicts.

Each seed's trained model is kept in ``--output-dir``/models, keyed by the training settings, and reused by later runs
with the same settings (the log says so); ``--retrain`` ignores it.

It prints mean ± 95% Student-t intervals over seeds and writes the log and a plot to ``--output-dir``; ``--publish``
also copies them to ``benchmarks/pruning_output.txt`` and ``docs/images/pruning_benchmark.png`` and puts the log into
the results block of ``docs/guide/head_pruning.md``. ``--quick`` is a tiny configuration for CI::

    python benchmarks/pruning.py --publish
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting costs about 8 ms per parallel op on small shared VMs; passive waiting changes no
# result. libgomp reads it once, when torch loads, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import hashlib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_report import (  # the sibling script's training loop and statistics
    MODEL_KWARGS,
    Console,
    Split,
    accuracy,
    build_model,
    fill_results_block,
    format_interval,
    load_split,
    machine_description,
    mean_interval,
    t_quantile_975,
    train,
)

from gmar_lightning import explain
from gmar_lightning.capture import find_attention_layers
from gmar_lightning.heads import (
    head_counts,
    mask_from_order,
    michel_importance,
    present_heads,
    prune_gradually,
    prune_heads,
    random_order,
    select_heads,
    weight_magnitude_importance,
)
from gmar_lightning.model_loading import create_vit

REPO_ROOT = Path(__file__).resolve().parent.parent
PUBLISHED_LOG = REPO_ROOT / "benchmarks" / "pruning_output.txt"
PUBLISHED_PLOT = REPO_ROOT / "docs" / "images" / "pruning_benchmark.png"
PUBLISHED_PAGE = REPO_ROOT / "docs" / "guide" / "head_pruning.md"
RESULTS_START, RESULTS_END = "<!-- pruning-results:start -->", "<!-- pruning-results:end -->"

ORDERS: tuple[str, ...] = ("GMAR", "Michel", "magnitude", "random")
STAGES: tuple[str, ...] = ("pruned", "recovered")
QUICK = {
    "seeds": 2,
    "train_images": 64,
    "val_images": 32,
    "eval_images": 16,
    "epochs": 1,
    "recovery_epochs": 1,
    "fractions": [0.0, 0.5],
    "recovery_fractions": [0.5],
    "speed_model_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4},
    "speed_img_size": 32,
    "speed_batch": 4,
    "speed_repeats": 2,
}


@dataclass
class SeedResult:
    """Accuracy of one training seed: ``accuracy[stage][order][fraction index]`` over `stage_fractions`."""

    accuracy: dict[str, dict[str, list[float]]]
    seconds: dict[str, float]


def stage_fractions(args: argparse.Namespace, stage: str) -> list[float]:
    """The fractions a stage is measured at: every one as pruned; 0 and ``--recovery-fractions`` after recovery."""
    return args.fractions if stage == "pruned" else [0.0, *args.recovery_fractions]


@dataclass
class SpeedResult:
    """The timed model at each fraction."""

    heads: list[int]
    parameters: list[int]
    predicted_parameters: list[int]
    flops: list[float]
    predicted_flops: list[float]
    seconds: list[list[float]]
    """Wall-clock seconds of each timed batch, per fraction."""
    cpu_seconds: list[list[float]]
    """CPU seconds of this process (all threads) for each timed batch, per fraction."""


# ----------------------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------------------


def head_scores(name: str, model: nn.Module, eval_split: Split, args: argparse.Namespace, seed: int) -> Tensor:
    """``[L, H]`` importance of the model's heads by order ``name`` (low = removed first; missing heads ignored)."""
    if name == "GMAR":
        explanation = explain(model, eval_split.images, method="gmar_l1", target=eval_split.labels)
        return explanation.head_weights.mean(dim=0)
    if name == "Michel":
        return michel_importance(model, eval_split.batches(args.eval_batch), progress=False)
    if name == "magnitude":
        return weight_magnitude_importance(model)
    # The seeded random order as ranks, so every step of a gradual pruning follows the same random order.
    present = present_heads(model)
    order = random_order(*present.shape, seed=seed)
    ranks = torch.empty(present.shape)
    ranks[order[:, 0], order[:, 1]] = torch.arange(len(order), dtype=ranks.dtype)
    return ranks


def prune_least_important(model: nn.Module, scores: Tensor, count: int) -> nn.Module:
    """Remove the ``count`` lowest-scoring heads the model has (a layer may lose all of its heads)."""
    prune_heads(model, select_heads(scores, present_heads(model), count))
    return model


def recovery_description(args: argparse.Namespace, short: bool = False) -> str:
    """What the recovered models went through, for the tables (``short``: the plot)."""
    epochs = f"{args.recovery_epochs}-epoch recovery" + ("" if short else " fine-tune")
    text = f"a {epochs}" if args.prune_steps == 1 else f"{args.prune_steps} pruning steps, each with a {epochs}"
    if args.distill_alpha > 0:
        settings = f"alpha {args.distill_alpha:g}, T {args.distill_temperature:g}"
        text += f" (distillation {settings})" if short else f", distilling from the unpruned model ({settings})"
    return text


def recover(
    model: nn.Module, train_split: Split, args: argparse.Namespace, seed: int, teacher: nn.Module | None
) -> nn.Module:
    """The recovery fine-tune: ``--recovery-epochs`` of the training loop at ``--recovery-lr``, distilling from
    ``teacher`` (the trained model before any pruning) when ``--distill-alpha`` is above 0."""
    recovery = argparse.Namespace(**{**vars(args), "epochs": args.recovery_epochs, "lr": args.recovery_lr})
    train(model, train_split, recovery, seed, teacher if args.distill_alpha > 0 else None)
    return model


def gradual_prune_and_recover(
    model: nn.Module,
    name: str,
    count: int,
    splits: tuple[Split, Split],
    args: argparse.Namespace,
    seed: int,
    first_scores: Tensor,
) -> nn.Module:
    """Remove ``count`` heads in ``--prune-steps`` equal steps (``prune_gradually``), each followed by the recovery
    fine-tune; the heads are ranked again by the same order on the model as it is before each step (``first_scores``
    for the first)."""
    train_split, eval_split = splits
    teacher = copy.deepcopy(model).eval()
    full = present_heads(model)

    def scores(current: nn.Module) -> Tensor:
        unpruned = torch.equal(present_heads(current), full)
        return first_scores if unpruned else head_scores(name, current, eval_split, args, seed)

    prune_gradually(
        model, count, args.prune_steps, scores, lambda pruned: recover(pruned, train_split, args, seed, teacher)
    )
    return model


def recovered_unpruned(model: nn.Module, train_split: Split, args: argparse.Namespace, seed: int) -> nn.Module:
    """The unpruned model given the same recovery as a pruned one: ``--prune-steps`` fine-tunes, the same teacher."""
    teacher = copy.deepcopy(model).eval()
    model = copy.deepcopy(model)
    for _ in range(args.prune_steps):
        recover(model, train_split, args, seed, teacher)
    return model


TRAINING_SETTINGS = ("train_images", "epochs", "batch_size", "lr", "weight_decay", "image_size", "num_classes")


def cached_model_path(args: argparse.Namespace, seed: int) -> Path:
    """Where the trained model of ``seed`` is kept: named by a hash of everything its training depends on."""
    settings = {name: getattr(args, name) for name in TRAINING_SETTINGS}
    # The thread count changes float rounding, and over 10 epochs the trained model (seed 2: 0.886 vs 0.904 accuracy).
    settings.update(seed=seed, model=MODEL_KWARGS, torch=torch.__version__, threads=torch.get_num_threads())
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return args.output_dir / "models" / f"seed{seed}-{digest}.pth"


def trained_model(args: argparse.Namespace, train_split: Split, seed: int) -> tuple[nn.Module, bool]:
    """The model trained on ``seed``'s split, and whether it came from an earlier run's cache."""
    model = build_model(args, seed)
    path = cached_model_path(args, seed)
    if path.is_file() and not args.retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), True
    train(model, train_split, args, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # renamed when complete, so another run never reads half a file
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    return model, False


def run_seed(args: argparse.Namespace, seed: int, console: Console) -> SeedResult:
    """Train one model, prune it to every fraction in every order, and measure accuracy before and after recovery."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    train_split = load_split(args, args.train_images, seed, 0, f"seed {seed}: train images")
    val_split = load_split(args, args.val_images, seed, args.train_images, f"seed {seed}: validation images")
    eval_split = load_split(
        args, args.eval_images, seed, args.train_images + args.val_images, f"seed {seed}: importance images"
    )
    model, cached = trained_model(args, train_split, seed)
    seconds["training (cached model)" if cached else "training"] = time.perf_counter() - start

    start = time.perf_counter()
    scores = {name: head_scores(name, model, eval_split, args, seed) for name in args.orders}
    total_heads = int(present_heads(model).sum())
    baseline = accuracy(model, val_split, args.eval_batch)
    recovered_baseline = accuracy(recovered_unpruned(model, train_split, args, seed), val_split, args.eval_batch)
    result: dict[str, dict[str, list[float]]] = {
        "pruned": {name: [baseline] for name in args.orders},
        "recovered": {name: [recovered_baseline] for name in args.orders},
    }
    steps = [(name, fraction) for name in args.orders for fraction in args.fractions[1:]]
    for name, fraction in tqdm(steps, desc=f"seed {seed}: prune and recover", leave=False):
        count = round(fraction * total_heads)
        pruned = prune_least_important(copy.deepcopy(model), scores[name], count)
        result["pruned"][name].append(accuracy(pruned, val_split, args.eval_batch))
        if fraction in args.recovery_fractions:
            recovered = gradual_prune_and_recover(
                copy.deepcopy(model), name, count, (train_split, eval_split), args, seed, scores[name]
            )
            result["recovered"][name].append(accuracy(recovered, val_split, args.eval_batch))
    seconds["pruning and recovery"] = time.perf_counter() - start
    recovered_orders = [
        f"{fraction:g} removed: " + ", ".join(f"{name} {result['recovered'][name][index]:.3f}" for name in args.orders)
        for index, fraction in enumerate(args.recovery_fractions, start=1)
    ]
    console.print(
        f"seed {seed}: validation accuracy {baseline:.3f} ({args.val_images} images), after the recovery fine-tune "
        f"{recovered_baseline:.3f} unpruned, {'; '.join(recovered_orders)}; "
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    )
    return SeedResult(result, seconds)


# ----------------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, images: Tensor) -> float:
    """Forward FLOPs, counted on the unfused attention path (the counter does not see fused CPU attention)."""
    layers = find_attention_layers(model)
    for layer in layers:
        layer.module.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(images)
    finally:
        for layer in layers:
            layer.module.fused_attn = True
    return float(counter.get_total_flops())


def head_cost(model: nn.Module, num_tokens: int, batch: int) -> tuple[int, float]:
    """Parameters and forward FLOPs of one head: q/k/v rows with biases, ``proj`` columns, and its attention."""
    attention = find_attention_layers(model)[0].module
    dim, head_dim = attention.qkv.in_features, attention.head_dim
    parameters = 4 * dim * head_dim + (3 * head_dim if attention.qkv.bias is not None else 0)
    # 2 FLOPs per multiply-add: 4 projections of width head_dim per token, then q k^T and attn v per token pair.
    flops = batch * (2 * num_tokens * 4 * dim * head_dim + 2 * 2 * num_tokens * num_tokens * head_dim)
    return parameters, float(flops)


def measure_speed(args: argparse.Namespace) -> SpeedResult:
    """Prune a ViT-S/16-shaped model to each fraction (seeded random order) and time batched inference."""
    torch.manual_seed(0)
    full = create_vit(args.speed_model, 1000, img_size=args.speed_img_size, model_kwargs=args.speed_model_kwargs).eval()
    images = torch.randn(args.speed_batch, 3, args.speed_img_size, args.speed_img_size)
    num_layers, num_heads = len(find_attention_layers(full)), head_counts(full)[0]
    num_tokens = full.patch_embed.num_patches + full.num_prefix_tokens
    per_head_parameters, per_head_flops = head_cost(full, num_tokens, args.speed_batch)
    order = random_order(num_layers, num_heads, seed=0)
    models, counts = [], []
    for fraction in args.fractions:
        model = copy.deepcopy(full)
        count = round(fraction * num_layers * num_heads)
        prune_heads(model, mask_from_order(order, count, num_layers, num_heads))
        models.append(model)
        counts.append(count)
    full_parameters = sum(p.numel() for p in full.parameters())
    full_flops = count_flops(full, images)
    seconds: list[list[float]] = [[] for _ in models]
    cpu_seconds: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:  # warm-up: allocator and kernel selection
            model(images)
        # Interleaved, so load from other processes on a shared machine hits every fraction alike.
        for _ in tqdm(range(args.speed_repeats), desc="timing", leave=False):
            for index, model in enumerate(models):
                start, cpu_start = time.perf_counter(), time.process_time()
                model(images)
                seconds[index].append(time.perf_counter() - start)
                cpu_seconds[index].append(time.process_time() - cpu_start)
    return SpeedResult(
        heads=[num_layers * num_heads - count for count in counts],
        parameters=[sum(p.numel() for p in model.parameters()) for model in models],
        predicted_parameters=[full_parameters - count * per_head_parameters for count in counts],
        flops=[count_flops(model, images) for model in models],
        predicted_flops=[full_flops - count * per_head_flops for count in counts],
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def accuracy_table(results: Sequence[SeedResult], stage: str, args: argparse.Namespace, total_heads: int) -> str:
    rows = []
    for index, fraction in enumerate(stage_fractions(args, stage)):
        cells = [format_interval([r.accuracy[stage][name][index] for r in results]) for name in args.orders]
        rows.append([f"{fraction:.3f} ({round(fraction * total_heads):2d} heads)", *cells])
    return _table(["fraction removed", *args.orders], rows)


def best_order(results: Sequence[SeedResult], stage: str, index: int) -> tuple[str, float, float]:
    """The order with the highest mean accuracy at fraction ``index``, its mean accuracy loss and interval."""
    orders = list(results[0].accuracy[stage])
    losses = {name: [r.accuracy[stage][name][0] - r.accuracy[stage][name][index] for r in results] for name in orders}
    name = min(orders, key=lambda order: statistics.fmean(losses[order]))
    mean, half_width = mean_interval(losses[name])
    return name, mean, half_width


def speed_table(speed: SpeedResult, args: argparse.Namespace) -> str:
    rows = []
    walls = [statistics.median(values) for values in speed.seconds]
    cpus = [statistics.median(values) for values in speed.cpu_seconds]
    for index, fraction in enumerate(args.fractions):
        flop_saving = 1.0 - speed.flops[index] / speed.flops[0]
        cells = [
            f"{fraction:.3f}",
            str(speed.heads[index]),
            f"{speed.parameters[index] / 1e6:.3f}M ({speed.predicted_parameters[index] / 1e6:.3f}M)",
            f"{speed.flops[index] / 1e9:.2f} ({speed.predicted_flops[index] / 1e9:.2f})",
            f"{100 * flop_saving:.1f}%",
        ]
        for medians in (walls, cpus):
            saving = 1.0 - medians[index] / medians[0]
            ratio = "-" if flop_saving <= 0 else f"{saving / flop_saving:.2f}"
            cells += [f"{medians[index]:.3f}", f"{100 * saving:.1f}%", ratio]
        rows.append(cells)
    header = ["fraction", "heads", "params (predicted)", "GFLOPs (predicted)", "FLOP saving"]
    header += ["wall s", "wall saving", "/FLOP", "CPU s", "CPU saving", "/FLOP"]
    return _table(header, rows)


def save_plot(results: Sequence[SeedResult], speed: SpeedResult, args: argparse.Namespace, path: Path) -> None:
    figure = Figure(figsize=(11.0, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    for panel, stage in zip(axes[:2], STAGES if results else (), strict=False):
        fractions = stage_fractions(args, stage)
        for name in args.orders:
            stats = [mean_interval([r.accuracy[stage][name][i] for r in results]) for i in range(len(fractions))]
            means = [mean for mean, _ in stats]
            (line,) = panel.plot(fractions, means, marker="o", label=name)
            if len(results) > 1:
                low = [mean - width for mean, width in stats]
                high = [mean + width for mean, width in stats]
                panel.fill_between(fractions, low, high, color=line.get_color(), alpha=0.12, linewidth=0)
        title = "as pruned" if stage == "pruned" else f"after {recovery_description(args, short=True)}"
        panel.set_title(title, fontsize=10)
        panel.set_xlabel("fraction of heads removed")
        panel.set_ylabel("validation accuracy")
        panel.set_ylim(0.0, 1.02)
        panel.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].plot(args.fractions, [1 - f / speed.flops[0] for f in speed.flops], marker="o", label="FLOP saving")
    for values, label in ((speed.seconds, "wall-clock saving"), (speed.cpu_seconds, "CPU-time saving")):
        medians = [statistics.median(times) for times in values]
        axes[2].plot(args.fractions, [1 - m / medians[0] for m in medians], marker="s", label=label)
    axes[2].set_title(f"{args.speed_model}, {args.speed_img_size} px, batch {args.speed_batch}, CPU", fontsize=10)
    axes[2].set_xlabel("fraction of heads removed")
    axes[2].set_ylabel("saving")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def publish(console: Console, plot_path: Path) -> None:
    """Copy the log and plot to their committed places and put the log into the results block of the guide."""
    PUBLISHED_LOG.write_text(console.text(), encoding="utf-8")
    shutil.copyfile(plot_path, PUBLISHED_PLOT)
    fill_results_block(PUBLISHED_PAGE, RESULTS_START, RESULTS_END, console.text())


def report_accuracy(results: Sequence[SeedResult], args: argparse.Namespace, console: Console) -> None:
    """Print the accuracy tables and the best order at 50% heads removed."""
    total_heads = MODEL_KWARGS["depth"] * MODEL_KWARGS["num_heads"]
    interval_note = (
        f"± = 95% Student-t half-width over {args.seeds} seeds (t_0.975,{args.seeds - 1} = "
        f"{t_quantile_975(args.seeds - 1):.3f})"
        if args.seeds > 1
        else "one seed: no interval"
    )
    for stage in STAGES:
        what = "as pruned" if stage == "pruned" else f"after {recovery_description(args)}"
        console.print(f"Validation accuracy ({args.val_images} images), heads removed least important first, {what}")
        console.print(f"{interval_note}")
        console.print(accuracy_table(results, stage, args, total_heads))
        console.print()
    if 0.5 in args.recovery_fractions:
        for stage in STAGES:
            name, loss, half_width = best_order(results, stage, stage_fractions(args, stage).index(0.5))
            width = "n/a" if math.isnan(half_width) else f"{100 * half_width:.2f}"
            console.print(
                f"best order at 50% removed, {stage}: {name}, accuracy lost {100 * loss:.2f} ± {width} points"
            )
        console.print()


def _orders(text: str) -> list[str]:
    names = text.split(",")
    if not names or len(set(names)) != len(names) or not set(names) <= set(ORDERS):
        raise argparse.ArgumentTypeError(f"must be distinct names among {','.join(ORDERS)}, got {text!r}")
    return names


def _fractions_removed(text: str) -> list[float]:
    values = [float(value) for value in text.split(",")]
    if values != sorted(set(values)) or not all(0.0 < value < 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"must be increasing fractions in (0, 1), got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    values = [float(value) for value in text.split(",")]
    if values[0] != 0.0 or values != sorted(set(values)) or not all(0.0 <= value < 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"must be increasing fractions in [0, 1) starting at 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; the defaults are the configuration of the published numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="how many training seeds: --first-seed onwards")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the first training seed; tune recipes on 100 and up, report 0 and up"
    )
    parser.add_argument("--train-images", type=int, default=2500, help="training images per seed")
    parser.add_argument("--val-images", type=int, default=500, help="validation images (accuracy)")
    parser.add_argument("--eval-images", type=int, default=96, help="held-out images GMAR and Michel rank heads on")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--recovery-epochs", type=int, default=3, help="epochs of each recovery fine-tune")
    parser.add_argument("--recovery-lr", type=float, default=5e-4, help="peak learning rate of the recovery fine-tune")
    parser.add_argument(
        "--distill-alpha", type=float, default=0.0, help="weight of distillation from the unpruned model (0: off)"
    )
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument(
        "--prune-steps", type=int, default=2, help="prune in this many equal steps, each followed by the recovery"
    )
    parser.add_argument(
        "--recovery-fractions", type=_fractions_removed, default=[0.5], help="fractions that get the recovery, e.g. 0.5"
    )
    parser.add_argument(
        "--orders", type=_orders, default=list(ORDERS), help=f"pruning orders to measure (default {','.join(ORDERS)})"
    )
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--num-classes", type=int, default=4, help="shape classes")
    parser.add_argument("--fractions", type=_fractions, default=[0.0, 0.25, 0.5, 0.75], help="e.g. 0,0.25,0.5")
    parser.add_argument("--eval-batch", type=int, default=256, help="images per batch when evaluating")
    parser.add_argument("--speed-model", default="vit_small_patch16_224", help="timm model that is timed")
    parser.add_argument("--speed-img-size", type=int, default=224, help="input side of the timed model")
    parser.add_argument("--speed-batch", type=int, default=32, help="images per timed batch")
    parser.add_argument("--speed-repeats", type=int, default=5, help="timed batches per fraction (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every CPU)")
    parser.add_argument("--speed-only", action="store_true", help="only the timing part (e.g. on a quiet machine)")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (CI)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/pruning_benchmark"), help="log, plot, models")
    parser.add_argument("--retrain", action="store_true", help="train every seed even if its model is kept")
    parser.add_argument("--publish", action="store_true", help="also update the committed log, plot and docs block")
    parser.set_defaults(speed_model_kwargs={})
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the benchmark; returns the per-seed results and the speed measurements."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    if args.quick:
        if args.publish:
            raise SystemExit("--publish needs the full configuration; drop --quick.")
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1.")
    if args.prune_steps < 1:
        raise SystemExit("--prune-steps must be at least 1.")
    if not 0.0 <= args.distill_alpha <= 1.0 or args.distill_temperature <= 0:
        raise SystemExit("--distill-alpha must lie in [0, 1] and --distill-temperature be above 0.")
    if not set(args.recovery_fractions) <= set(args.fractions):
        raise SystemExit(f"--recovery-fractions {args.recovery_fractions} must be among --fractions {args.fractions}.")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    console = Console()
    console.print(f"command: {shlex.join(['python', 'benchmarks/pruning.py', *arguments])}")
    settings = {name: value for name, value in vars(args).items() if name not in ("output_dir", "publish")}
    console.print("settings: " + ", ".join(f"{name}={value}" for name, value in settings.items()))
    console.print(machine_description())
    console.print()

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = [] if args.speed_only else [run_seed(args, seed, console) for seed in seeds]
    if results:
        report_accuracy(results, args, console)

    start = time.perf_counter()
    speed = measure_speed(args)
    console.print(
        f"Inference of {args.speed_model} {args.speed_model_kwargs or ''} ({args.speed_img_size} px, batch "
        f"{args.speed_batch}, random weights, seeded random head order), median of {args.speed_repeats} interleaved "
        f"batches, {torch.get_num_threads()} threads; predicted = unpruned minus removed heads x per-head cost;"
    )
    console.print("wall = elapsed time, CPU = this process's CPU time (robust to other processes on a shared machine)")
    console.print(speed_table(speed, args))
    console.print(f"speed measurement: {time.perf_counter() - start:.0f} s")
    console.print()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.output_dir / "pruning_benchmark.png"
    save_plot(results, speed, args, plot_path)
    phases = {
        name: sum(r.seconds.get(name, 0.0) for r in results)
        for name in dict.fromkeys(name for r in results for name in r.seconds)
    }
    console.print(
        f"runtime: {time.perf_counter() - started:.0f} s in total ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in phases.items())
        + ")"
    )
    (args.output_dir / "pruning_output.txt").write_text(console.text(), encoding="utf-8")
    if args.publish:
        if args.speed_only:
            raise SystemExit("--publish needs the accuracy part too; drop --speed-only.")
        publish(console, plot_path)
    return {"results": results, "speed": speed}


if __name__ == "__main__":
    main()
