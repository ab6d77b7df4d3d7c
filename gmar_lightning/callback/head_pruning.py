"""HeadPruning: remove the least important attention heads at scheduled epochs while fine-tuning goes on.

The callback decides *when* and *how many*; [`gmar_lightning.heads.pruning`][gmar_lightning.heads.pruning] does the
work: the importance criteria, the choice of heads, the removal, the optimizer-state slicing and the speed measurement.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from gmar_lightning._io import atomic_write_text
from gmar_lightning.callback.gmar import GMARCallback, _first_loader, _preserved_rng
from gmar_lightning.callback.sinks import logger_run_dir
from gmar_lightning.capture import unwrap_model
from gmar_lightning.families import find_vision_transformer, hf
from gmar_lightning.heads.importance import michel_importance
from gmar_lightning.heads.masking import head_layers
from gmar_lightning.heads.pruning import (
    head_counts,
    measure_speedup,
    present_heads,
    prune_heads,
    restore_pruning_on_load,
    select_heads,
    slice_optimizer_state,
    weight_magnitude_importance,
)

__all__ = ["HeadPruning"]

Criterion = Literal["gmar", "michel", "magnitude", "random"] | Callable[[nn.Module], Tensor]
CRITERIA = ("gmar", "michel", "magnitude", "random")
HISTORY_JSON = "head_pruning.json"
"""File the callback writes into every logger's run folder at the start of the fit and after every pruning: the
callback's ``history``."""


class HeadPruning(Callback):
    r"""Physically remove the least important attention heads of a ViT at scheduled epochs; training goes on.

    In the spirit of Lightning's ``ModelPruning``, but structured: the heads leave the model
    ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]), so parameters, FLOPs and time drop for real. At the
    start of every training epoch that ``epochs`` schedules, the callback scores every head the model still has with
    ``criterion``, removes the ``amount`` least important (keeping ``min_heads_per_layer`` per layer), and slices each
    optimizer's state (Adam/AdamW moments, SGD momentum) so that the remaining heads keep theirs: nothing is reset.
    The averaged copy of Lightning's ``WeightAveraging``/``EMAWeightAveraging`` loses the same heads. Under DDP, rank
    0 ranks the heads, every rank removes the same ones at the same step, and the model is wrapped anew so DDP's
    gradient buckets follow the new parameters.

    It logs ``head_pruning/heads`` and ``head_pruning/parameters`` at the start of the fit and after every pruning,
    ``head_pruning/removed_heads`` at every pruning and ``head_pruning/speedup`` (the unpruned over the pruned forward
    time of ``throughput_batch`` random images, timed interleaved, so machine load slows both alike) to every logger;
    the removed heads go to TensorBoard as text, to W&B as a table and to every run folder as ``head_pruning.json``
    (MLflow: an artifact). Its ``history`` is saved in checkpoints. A pruning's ``step`` is ``trainer.global_step``
    at the epoch start: Lightning's logging step of the first training batch after it, later than the step at which
    the previous validation's ``val_loss`` (and the evaluations of the unpruned model) were logged.

    Pruning at the start of an epoch keeps resuming exact: a checkpoint written at the end of an epoch holds the
    model as it trained, with its pruning spec in the state dict (``kept_heads`` buffers), and a resumed fit prunes
    the fresh model to match before loading the weights and the sliced optimizer state. A checkpoint saved before a
    pruning does not fit the pruned model; load it into a freshly built one. With ``criterion="gmar"`` it reads the
    head-importance trajectory of the run's [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback], which keeps
    explaining the shrinking model (missing heads are NaN in its trajectory); only evaluations of the model as it is
    (after the previous pruning) count, and ``setup`` checks that the schedules leave one before every pruning.

    Args:
        amount: Heads to remove at each scheduled epoch: a fraction in ``(0, 1)`` of the model's original head count
            (rounded), or a whole number of heads (``2`` or ``2.0``, as YAML configs give it); a callable gets the
            epoch and returns either (0 skips). Fewer go, with a warning, when ``min_heads_per_layer`` leaves no more.
        criterion: How heads are scored, least important first: ``"gmar"`` (mean GMAR head weight over the last
            ``gmar_last_n`` evaluations of the run's GMARCallback), ``"michel"`` (Michel et al. importance on up to
            ``michel_batches`` batches of the first validation loader), ``"magnitude"`` (L2 norm of each head's
            weights), ``"random"`` (seeded), or a callable ``criterion(vit) -> Tensor [L, H]`` by original head
            index.
        epochs: The epochs at whose start to prune, or a callable ``epoch -> bool``.
        gmar_last_n: GMAR evaluations averaged by ``criterion="gmar"``.
        gmar_name: With ``criterion="gmar"``, the ``name`` of the GMARCallback whose head weights rank the heads, where
            the Trainer holds several with a GMAR method (e.g. one watching the EMA copy); ``None``: the only one.
        michel_batches: Validation batches read by ``criterion="michel"``.
        min_heads_per_layer: Heads every layer keeps (0 allows emptying a layer of a timm ViT; its attention branch
            then outputs only ``proj``'s bias; transformers ViTs need at least 1). The model as a whole always keeps
            at least one head.
        model_getter: Returns the ViT from the LightningModule; default: the outermost timm or transformers ViT
            inside it.
        throughput_batch: Images in the timed batch of ``head_pruning/speedup``; 0 skips the measurement (which
            keeps a copy of the unpruned ViT on rank 0 while it times the two).
        seed: Seed of ``criterion="random"`` (combined with the epoch).
        verbose: Print each pruning's removed heads, head counts and parameter count.

    Raises:
        ValueError: If an argument is invalid (checked here), or in ``setup`` if the strategy shards parameters,
            ``criterion="gmar"`` finds no GMARCallback with a GMAR method or no evaluation before a scheduled
            pruning, or ``min_heads_per_layer``/``amount`` leave nothing to remove or nothing to keep.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from gmar_lightning import GMARCallback, HeadPruning
        >>> pruning = HeadPruning(amount=0.25, criterion="gmar", epochs=[2, 4])  # half the heads gone by epoch 4
        >>> trainer = Trainer(callbacks=[GMARCallback(), pruning], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        amount: int | float | Callable[[int], int | float] = 0.25,
        criterion: Criterion = "gmar",
        epochs: Sequence[int] | Callable[[int], bool] = (1,),
        gmar_last_n: int = 3,
        gmar_name: str | None = None,
        michel_batches: int = 8,
        min_heads_per_layer: int = 1,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        throughput_batch: int = 8,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if not callable(amount):
            amount = _checked_amount(amount)
        if not callable(criterion) and criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {', '.join(CRITERIA)} or a callable, got {criterion!r}.")
        if not callable(epochs) and (
            isinstance(epochs, str | bytes)
            or not isinstance(epochs, Sequence)
            or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs)
        ):
            raise ValueError(
                f"`epochs` must be a list of epoch numbers >= 0 or a callable epoch -> bool, got {epochs!r}."
            )
        for name, value, minimum in (
            ("gmar_last_n", gmar_last_n, 1),
            ("michel_batches", michel_batches, 1),
            ("min_heads_per_layer", min_heads_per_layer, 0),
            ("throughput_batch", throughput_batch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if gmar_name is not None and (not isinstance(gmar_name, str) or criterion != "gmar"):
            raise ValueError(
                f"`gmar_name` names the GMARCallback that ranks heads for criterion='gmar', got {gmar_name!r} with "
                f"criterion={criterion!r}; pass a callback's `name` string with criterion='gmar', or drop it."
            )
        if model_getter is not None and not callable(model_getter):
            raise TypeError(f"`model_getter` must be callable, got {type(model_getter).__name__}.")
        self.amount = amount
        self.criterion = criterion
        self.epochs = epochs if callable(epochs) else tuple(epochs)
        self.gmar_last_n = gmar_last_n
        self.gmar_name = gmar_name
        self.michel_batches = michel_batches
        self.min_heads_per_layer = min_heads_per_layer
        self.model_getter = model_getter
        self.throughput_batch = throughput_batch
        self.seed = seed
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []
        """One entry per pruning: epoch, step, criterion, heads asked for and removed ``{layer name: [head, ...]}``,
        heads per layer, parameters before and after, and the measured speed-up (or None)."""

    def _model(self, pl_module: nn.Module) -> nn.Module:
        model = self.model_getter(pl_module) if self.model_getter is not None else find_vision_transformer(pl_module)
        return unwrap_model(model)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # DeepSpeed and XLA derive from DDPStrategy but shard or wrap the model their own way.
        if isinstance(strategy, DeepSpeedStrategy | XLAStrategy) or not isinstance(
            strategy, DDPStrategy | SingleDeviceStrategy
        ):
            raise ValueError(
                f"HeadPruning changes parameter shapes, which {type(strategy).__name__} cannot follow; use "
                "strategy='ddp' or a single device."
            )
        swa = next((c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)), None)
        if swa is not None:
            raise ValueError(
                "HeadPruning cannot slice StochasticWeightAveraging's copy of the model; use Lightning's "
                "WeightAveraging (or EMAWeightAveraging), whose averaged copy loses the same heads."
            )
        if self.criterion == "gmar":
            gmar = self._check_gmar_callback(trainer)
            if stage == "fit":
                self._check_gmar_schedule(trainer, gmar)
        model = self._model(pl_module)
        present = present_heads(model)  # finds the attention layers, or says why not
        if self.min_heads_per_layer == 0 and hf.is_transformers_vit(model):
            raise ValueError(
                "`min_heads_per_layer=0` may empty a layer, which transformers attention cannot run without; use 1."
            )
        if stage == "fit":
            self._check_amount_fits(present)
        # A resumed fit loads a pruned checkpoint into a fresh module: prune the module to match first. An averaged
        # copy made before this line needs its own hook; one made after copies the module's.
        restore_pruning_on_load(pl_module)
        for average in self._averaged_copies(trainer):
            restore_pruning_on_load(average)

    def _check_amount_fits(self, present: Tensor) -> None:
        per_layer = present.sum(dim=1)
        if self.min_heads_per_layer >= int(per_layer.max()):
            raise ValueError(
                f"`min_heads_per_layer={self.min_heads_per_layer}` keeps every head (layers have at most "
                f"{int(per_layer.max())}), so nothing can be pruned; use at most {int(per_layer.max()) - 1}."
            )
        if isinstance(self.amount, int) and self.min_heads_per_layer == 0 and self.amount >= int(present.sum()):
            raise ValueError(
                f"`amount={self.amount}` removes every one of the model's {int(present.sum())} heads, which leaves "
                f"nothing to classify with or explain; use at most {int(present.sum()) - 1}."
            )

    def _check_gmar_schedule(self, trainer: pl.Trainer, gmar: GMARCallback) -> None:
        """Every scheduled pruning needs a GMAR evaluation of the model as it is: after the previous pruning."""
        if callable(self.epochs) or not self.epochs:
            return  # checked at each pruning instead
        if trainer.limit_val_batches == 0:
            raise ValueError(
                "`criterion='gmar'` ranks heads by GMAR evaluations, but `limit_val_batches=0` turns validation off; "
                "pick another criterion or validate."
            )
        period = math.lcm(gmar.every_n_epochs, trainer.check_val_every_n_epoch or 1)
        previous = 0
        for epoch in sorted(set(self.epochs)):
            # Evaluations run at the end of epochs k with (k + 1) % period == 0; one must fall in [previous, epoch).
            if (epoch // period) * period < previous + 1:
                suggestion = [period * (index + 1) for index in range(len(set(self.epochs)))]
                since = "the start" if previous == 0 else f"the pruning at epoch {previous}"
                raise ValueError(
                    f"`epochs={sorted(set(self.epochs))}` prunes at epoch {epoch} with no GMAR evaluation since "
                    f"{since} (GMAR evaluates at the end of epochs {period - 1}, {2 * period - 1}, ...); use e.g. "
                    f"`epochs={suggestion}`, or another criterion."
                )
            previous = epoch

    @staticmethod
    def _ranking_callbacks(trainer: pl.Trainer) -> list[GMARCallback]:
        return [c for c in trainer.callbacks if isinstance(c, GMARCallback) and c.head_method]

    def _gmar_callback(self, trainer: pl.Trainer) -> GMARCallback | None:
        """The GMARCallback whose head weights rank the heads: the one named ``gmar_name``, else the first (``setup``
        refuses several without a name); ``None`` without one."""
        ranking = self._ranking_callbacks(trainer)
        if self.gmar_name is not None:
            return next((c for c in ranking if c.name == self.gmar_name), None)
        return ranking[0] if ranking else None

    def _check_gmar_callback(self, trainer: pl.Trainer) -> GMARCallback:
        gmar = self._gmar_callback(trainer)
        names = [c.name for c in self._ranking_callbacks(trainer)]
        if gmar is None and self.gmar_name is not None:
            raise ValueError(
                f"`gmar_name={self.gmar_name!r}` names no GMARCallback with a GMAR method ('gmar_l1' or 'gmar_l2') "
                f"in the Trainer's callbacks (their names: {names}); pass one of those."
            )
        if gmar is None:
            raise ValueError(
                "`criterion='gmar'` needs a GMARCallback with a GMAR method ('gmar_l1' or 'gmar_l2') in the "
                "Trainer's callbacks; add one, or pick another criterion."
            )
        if self.gmar_name is None and len(names) > 1:
            raise ValueError(
                f"`criterion='gmar'` finds {len(names)} GMARCallbacks with a GMAR method (names {names}); pass "
                "HeadPruning(gmar_name=...) to say whose head weights rank the heads."
            )
        return gmar

    @staticmethod
    def _averaged_copies(trainer: pl.Trainer) -> list[nn.Module]:
        """The LightningModule copies that Lightning's WeightAveraging callbacks average into (once created)."""
        copies = (getattr(c, "_average_model", None) for c in trainer.callbacks if isinstance(c, WeightAveraging))
        return [average.module for average in copies if average is not None]

    def _scheduled(self, epoch: int) -> bool:
        return bool(self.epochs(epoch)) if callable(self.epochs) else epoch in self.epochs

    def _count(self, epoch: int, total_heads: int) -> int:
        amount = self.amount(epoch) if callable(self.amount) else self.amount
        amount = _checked_amount(amount, allow_zero=True)
        return round(amount * total_heads) if isinstance(amount, float) else amount

    def _importance(self, trainer: pl.Trainer, model: nn.Module, epoch: int) -> Tensor:
        if callable(self.criterion):
            return torch.as_tensor(self.criterion(model)).detach().float().cpu()
        if self.criterion == "magnitude":
            return weight_magnitude_importance(model)
        if self.criterion == "random":
            present = present_heads(model)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            return torch.rand(present.shape, generator=generator)
        if self.criterion == "michel":
            loader = _first_loader(trainer.val_dataloaders)
            if loader is None:
                loader = trainer.train_dataloader
            with _preserved_rng():  # reading batches must not shift the training's random streams
                return michel_importance(model, loader, max_batches=self.michel_batches, progress=False)
        return self._gmar_importance(trainer, model, epoch)

    def _gmar_importance(self, trainer: pl.Trainer, model: nn.Module, epoch: int) -> Tensor:
        gmar = self._gmar_callback(trainer)
        if gmar._disabled:
            raise ValueError(
                f"`criterion='gmar'` cannot rank heads at epoch {epoch}: the GMARCallback switched itself off (see "
                "its warning), so its last ranking is stale; fix that error or pick another criterion."
            )
        trajectory = gmar.trajectory
        # Only evaluations of the model as it is now: those recorded after the previous pruning.
        fresh = len(trajectory) - (self.history[-1].get("gmar_rows", 0) if self.history else 0)
        if fresh <= 0:
            since = f"the pruning at epoch {self.history[-1]['epoch']}" if self.history else "the start"
            raise ValueError(
                f"`criterion='gmar'` has no GMAR evaluation since {since} to rank heads by at epoch {epoch}; "
                f"schedule pruning after a GMAR evaluation (GMARCallback every_n_epochs={gmar.every_n_epochs})."
            )
        weights = trajectory.weights[-min(fresh, self.gmar_last_n) :].mean(dim=0)
        names = [layer.name for layer in head_layers(model)]
        if trajectory.layer_names and trajectory.layer_names != names and set(names) <= set(trajectory.layer_names):
            # The explanation has layers the head tools do not act on (a transformers SigLIP pool's
            # nn.MultiheadAttention): they rank no heads.
            weights = weights[[trajectory.layer_names.index(name) for name in names]]
        return weights

    def _choose(self, trainer: pl.Trainer, model: nn.Module, epoch: int) -> tuple[int, dict[int, list[int]]]:
        """``(heads asked for, {layer: [head, ...]})``; raises if the choice would remove every head."""
        present = present_heads(model)
        count = self._count(epoch, int(present.numel()))
        if count == 0:
            return 0, {}
        heads = select_heads(self._importance(trainer, model, epoch), present, count, self.min_heads_per_layer)
        if sum(len(chosen) for chosen in heads.values()) == int(present.sum()):
            raise ValueError(
                f"HeadPruning at epoch {epoch}: `amount` asks for {count} heads, every head the model has left "
                f"({int(present.sum())}), which leaves nothing to classify with or explain; lower `amount` or raise "
                "`min_heads_per_layer`."
            )
        return count, heads

    def _choose_on_rank_zero(self, trainer: pl.Trainer, model: nn.Module, epoch: int) -> Any:
        """Rank 0 chooses (only it holds the GMAR trajectory; loaders are sharded) and every rank gets its choice,
        or its error, so all ranks remove the same heads or stop together instead of hanging."""
        result: Any = None
        if trainer.is_global_zero:
            try:
                result = self._choose(trainer, model, epoch)
            except Exception as error:
                if trainer.world_size == 1:
                    raise
                result = error
        result = trainer.strategy.broadcast(result, src=0)
        if isinstance(result, Exception):
            raise result
        return result

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The starting point of the charts, and the history file in this run's folders (a resumed run's new folder).
        model = self._model(pl_module)
        metrics = {
            "head_pruning/heads": float(sum(head_counts(model))),
            "head_pruning/parameters": float(_parameters(model)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            self._write_history(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._scheduled(epoch) or any(entry["epoch"] == epoch for entry in self.history):
            return
        model = self._model(pl_module)
        count, heads = self._choose_on_rank_zero(trainer, model, epoch)
        if count == 0:
            return
        removed = sum(len(chosen) for chosen in heads.values())
        if removed < count:
            rank_zero_warn(
                f"HeadPruning at epoch {epoch}: `amount` asks for {count} heads but `min_heads_per_layer="
                f"{self.min_heads_per_layer}` leaves only {removed} to remove"
                + ("; none removed." if not removed else f"; removing {removed}.")
            )
        if not removed:
            return
        reference = copy.deepcopy(model) if self.throughput_batch and trainer.is_global_zero else None
        parameters_before = _parameters(model)
        changes = prune_heads(model, heads)
        for average in self._averaged_copies(trainer):
            prune_heads(self._model(average), heads)
        for optimizer in trainer.optimizers:
            slice_optimizer_state(optimizer, changes)
        self._rewrap_ddp(trainer)
        names = [layer.name for layer in head_layers(model)]
        gmar = self._gmar_callback(trainer)
        entry = {
            "epoch": epoch,
            "step": trainer.global_step,
            "criterion": self.criterion if isinstance(self.criterion, str) else "callable",
            "asked": count,
            "removed": {names[layer]: removed for layer, removed in heads.items()},
            "heads_per_layer": head_counts(model),
            "parameters_before": parameters_before,
            "parameters": _parameters(model),
            "speedup": None if reference is None else measure_speedup(reference, model, self._timing_images(model)),
            "gmar_rows": 0 if gmar is None else len(gmar.trajectory),
        }
        # Rank 0's entry everywhere: only it times the models and holds the GMAR trajectory.
        self.history.append(trainer.strategy.broadcast(entry, src=0))
        self._report(trainer, self.history[-1])

    @staticmethod
    def _rewrap_ddp(trainer: pl.Trainer) -> None:
        """Wrap the pruned module in a new DistributedDataParallel: the old one's gradient buckets and hooks belong to
        the replaced parameters. Every rank does it at the same point, as DDP's constructor is a collective."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

    def _timing_images(self, model: nn.Module) -> Tensor:
        if hf.is_transformers_vit(model):
            channels, size = hf.num_channels_of(model), hf.image_size_of(model)
        else:
            channels, size = model.patch_embed.proj.in_channels, tuple(model.patch_embed.img_size)
        parameter = next(model.parameters())
        generator = torch.Generator().manual_seed(0)  # a private stream: the training's RNG is not touched
        images = torch.randn(self.throughput_batch, channels, *size, generator=generator)
        return images.to(parameter.device, parameter.dtype)

    def _report(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        metrics = {
            "head_pruning/heads": float(sum(entry["heads_per_layer"])),
            "head_pruning/parameters": float(entry["parameters"]),
            "head_pruning/removed_heads": float(sum(len(heads) for heads in entry["removed"].values())),
        }
        if entry["speedup"] is not None:
            metrics["head_pruning/speedup"] = entry["speedup"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=entry["step"])
        if not trainer.is_global_zero:
            return
        self._write_history(trainer)
        rows = [[entry["step"], entry["epoch"], layer, str(heads)] for layer, heads in entry["removed"].items()]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                table = "\n".join(f"| {step} | {epoch} | {layer} | {heads} |" for step, epoch, layer, heads in rows)
                text = f"| step | epoch | layer | removed heads |\n|---|---|---|---|\n{table}"
                logger.experiment.add_text("head_pruning/removed", text, global_step=entry["step"])
            elif isinstance(logger, WandbLogger):
                history = [
                    [past["step"], past["epoch"], layer, str(heads)]
                    for past in self.history
                    for layer, heads in past["removed"].items()
                ]
                columns = ["step", "epoch", "layer", "heads"]
                logger.log_text("head_pruning/removed", columns=columns, data=history, step=entry["step"])
        if self.verbose:
            speed = "" if entry["speedup"] is None else f", {entry['speedup']:.2f}x as fast (interleaved timing)"
            rank_zero_info(
                f"HeadPruning at epoch {entry['epoch']} (step {entry['step']}): removed "
                f"{metrics['head_pruning/removed_heads']:.0f} heads by {entry['criterion']} {entry['removed']}; heads "
                f"per layer now {entry['heads_per_layer']}, parameters {entry['parameters_before']:,} -> "
                f"{entry['parameters']:,}{speed}."
            )

    def _write_history(self, trainer: pl.Trainer) -> None:
        """``head_pruning.json`` in every logger's run folder (an MLflow run's artifacts), or ``default_root_dir``."""
        text = json.dumps(self.history, indent=2) + "\n"
        folders: list[Path] = []
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(logger.run_id, text, HISTORY_JSON)
            else:
                folders.append(logger_run_dir(logger, trainer.default_root_dir))
        if not trainer.loggers:
            folders.append(Path(trainer.default_root_dir))
        for folder in dict.fromkeys(folders):
            os.makedirs(folder, exist_ok=True)
            atomic_write_text(folder / HISTORY_JSON, text)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]


def _checked_amount(amount: object, allow_zero: bool = False) -> int | float:
    """``amount`` as a number of heads (an int, or a whole float such as YAML's ``2.0``) or a fraction in (0, 1)."""
    if isinstance(amount, float) and amount >= 1 and amount.is_integer():
        amount = int(amount)
    whole = isinstance(amount, int) and not isinstance(amount, bool) and amount >= (0 if allow_zero else 1)
    fraction = isinstance(amount, float) and (0.0 < amount < 1.0 or (allow_zero and amount == 0.0))
    if not (whole or fraction):
        raise ValueError(
            "`amount` must be a fraction in (0, 1) of the original heads or a whole number of heads >= 1, got "
            f"{amount!r}."
        )
    return amount  # type: ignore[return-value]


def _parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
