"""HeadPruning: remove the least important attention heads at scheduled epochs while fine-tuning goes on.

The callback decides *when* and *how many*; [`gmar_lightning.heads.pruning`][gmar_lightning.heads.pruning] does the
work: the importance criteria, the choice of heads, the removal, the optimizer-state slicing and the throughput
measurement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from gmar_lightning._io import atomic_write_text
from gmar_lightning.callback.gmar import GMARCallback, _preserved_rng
from gmar_lightning.capture import unwrap_model
from gmar_lightning.families import find_vision_transformer, hf
from gmar_lightning.heads.importance import michel_importance
from gmar_lightning.heads.masking import head_layers
from gmar_lightning.heads.pruning import (
    head_counts,
    measure_throughput,
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
"""File the callback writes into the log directory after every pruning: the callback's ``history``."""


class HeadPruning(Callback):
    r"""Physically remove the least important attention heads of a ViT at scheduled epochs; training goes on.

    In the spirit of Lightning's ``ModelPruning``, but structured: the heads leave the model
    ([`prune_heads`][gmar_lightning.heads.pruning.prune_heads]), so parameters, FLOPs and time drop for real. At the
    start of every training epoch that ``epochs`` schedules, the callback scores every head the model still has with
    ``criterion``, removes the ``amount`` least important (keeping ``min_heads_per_layer`` per layer), and slices each
    optimizer's state (Adam/AdamW moments, SGD momentum) so that the remaining heads keep theirs: nothing is reset.
    It logs ``head_pruning/heads``, ``head_pruning/parameters`` and ``head_pruning/throughput`` (images per second,
    measured on a batch of ``throughput_batch`` random images before and after) to every logger, prints the removed
    heads, and keeps a ``history`` that is saved in checkpoints and written as ``head_pruning.json`` into the log
    directory.

    Pruning at the start of an epoch keeps resuming exact: a checkpoint written at the end of an epoch holds the
    model as it trained, with its pruning spec in the state dict (``kept_heads`` buffers), and a resumed fit prunes
    the fresh model to match before loading the weights and the sliced optimizer state. With ``criterion="gmar"``
    it reads the head-importance trajectory of the run's
    [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback], which keeps explaining the shrinking model (missing
    heads are NaN in its trajectory).

    Args:
        amount: Heads to remove at each scheduled epoch: a float in ``(0, 1)`` is a fraction of the model's original
            head count (rounded), an int a number of heads; a callable gets the epoch and returns either (0 skips).
        criterion: How heads are scored, least important first: ``"gmar"`` (mean GMAR head weight over the last
            ``gmar_last_n`` evaluations of the run's GMARCallback), ``"michel"`` (Michel et al. importance on up to
            ``michel_batches`` validation batches), ``"magnitude"`` (L2 norm of each head's weights), ``"random"``
            (seeded), or a callable ``criterion(vit) -> Tensor [L, H]`` by original head index.
        epochs: The epochs at whose start to prune, or a callable ``epoch -> bool``.
        gmar_last_n: GMAR evaluations averaged by ``criterion="gmar"``.
        michel_batches: Validation batches read by ``criterion="michel"``.
        min_heads_per_layer: Heads every layer keeps (0 allows emptying a layer of a timm ViT; its attention branch
            then outputs only ``proj``'s bias; transformers ViTs need at least 1).
        model_getter: Returns the ViT from the LightningModule; default: the outermost timm or transformers ViT
            inside it.
        throughput_batch: Images in the timed batch; 0 skips the measurement.
        seed: Seed of ``criterion="random"`` (combined with the epoch).
        verbose: Print each pruning's removed heads, head counts and parameter count.

    Raises:
        ValueError: If an argument is invalid (checked here), or in ``setup`` if training is distributed (parameter
            shapes change, which DDP and sharded strategies cannot follow) or ``criterion="gmar"`` finds no
            GMARCallback with a GMAR method.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from gmar_lightning import GMARCallback, HeadPruning
        >>> pruning = HeadPruning(amount=0.25, criterion="gmar", epochs=[2, 4])  # half the heads gone by epoch 4
        >>> trainer = Trainer(callbacks=[GMARCallback(), pruning], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        amount: float | int | Callable[[int], float | int] = 0.25,
        criterion: Criterion = "gmar",
        epochs: Sequence[int] | Callable[[int], bool] = (1,),
        gmar_last_n: int = 3,
        michel_batches: int = 8,
        min_heads_per_layer: int = 1,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        throughput_batch: int = 8,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if not callable(amount):
            _check_amount(amount)
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
        if model_getter is not None and not callable(model_getter):
            raise TypeError(f"`model_getter` must be callable, got {type(model_getter).__name__}.")
        self.amount = amount
        self.criterion = criterion
        self.epochs = epochs if callable(epochs) else tuple(epochs)
        self.gmar_last_n = gmar_last_n
        self.michel_batches = michel_batches
        self.min_heads_per_layer = min_heads_per_layer
        self.model_getter = model_getter
        self.throughput_batch = throughput_batch
        self.seed = seed
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []
        """One entry per pruning: epoch, step, removed heads ``{layer name: [head, ...]}``, heads per layer,
        parameters and throughput before and after."""
        self._log_dir: str | None = None

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = self.model_getter(pl_module) if self.model_getter is not None else find_vision_transformer(pl_module)
        return unwrap_model(model)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"HeadPruning changes parameter shapes, which {type(trainer.strategy).__name__} across "
                f"{trainer.world_size} processes cannot follow; train on one device (devices=1)."
            )
        if self.criterion == "gmar" and self._gmar_callback(trainer) is None:
            raise ValueError(
                "`criterion='gmar'` needs a GMARCallback with a GMAR method ('gmar_l1' or 'gmar_l2') in the Trainer's "
                "callbacks; add one, or pick another criterion."
            )
        self._log_dir = trainer.log_dir
        model = self._model(pl_module)
        present_heads(model)  # finds the attention layers, or says why not
        if self.min_heads_per_layer == 0 and hf.is_transformers_vit(model):
            raise ValueError(
                "`min_heads_per_layer=0` may empty a layer, which transformers attention cannot run without; use 1."
            )
        # A resumed fit loads a pruned checkpoint into a fresh module: prune the module to match first.
        restore_pruning_on_load(pl_module)

    @staticmethod
    def _gmar_callback(trainer: pl.Trainer) -> GMARCallback | None:
        return next((c for c in trainer.callbacks if isinstance(c, GMARCallback) and c.head_method), None)

    def _scheduled(self, epoch: int) -> bool:
        return bool(self.epochs(epoch)) if callable(self.epochs) else epoch in self.epochs

    def _count(self, epoch: int, total_heads: int) -> int:
        amount = self.amount(epoch) if callable(self.amount) else self.amount
        _check_amount(amount, allow_zero=True)
        return round(amount * total_heads) if isinstance(amount, float) else int(amount)

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
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, Sequence) else loaders
            if loader is None:
                loader = trainer.train_dataloader
            with _preserved_rng():  # reading batches must not shift the training's random streams
                return michel_importance(model, loader, max_batches=self.michel_batches, progress=False)
        trajectory = self._gmar_callback(trainer).trajectory
        if not len(trajectory):
            raise ValueError(
                f"`criterion='gmar'` has no GMAR evaluation to rank heads by at the start of epoch {epoch}; schedule "
                "pruning after the first validation (e.g. `epochs=[1]`)."
            )
        return trajectory.weights[-self.gmar_last_n :].mean(dim=0)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._scheduled(epoch) or any(entry["epoch"] == epoch for entry in self.history):
            return
        model = self._model(pl_module)
        present = present_heads(model)
        count = self._count(epoch, int(present.numel()))
        if count == 0:
            return
        importance = self._importance(trainer, model, epoch)
        heads = select_heads(importance, present, count, self.min_heads_per_layer)
        images = self._timing_images(model)
        before = {"parameters": _parameters(model), "throughput": self._throughput(model, images)}
        changes = prune_heads(model, heads)
        for optimizer in trainer.optimizers:
            slice_optimizer_state(optimizer, changes)
        names = [layer.name for layer in head_layers(model)]
        entry = {
            "epoch": epoch,
            "step": trainer.global_step,
            "criterion": self.criterion if isinstance(self.criterion, str) else "callable",
            "removed": {names[layer]: removed for layer, removed in heads.items()},
            "heads_per_layer": head_counts(model),
            "parameters_before": before["parameters"],
            "parameters": _parameters(model),
            "throughput_before": before["throughput"],
            "throughput": self._throughput(model, images),
        }
        self.history.append(entry)
        self._report(trainer, entry)

    def _timing_images(self, model: nn.Module) -> Tensor | None:
        if not self.throughput_batch:
            return None
        if hf.is_transformers_vit(model):
            side = model.config.image_size
            channels, size = hf.num_channels_of(model), (side, side) if isinstance(side, int) else tuple(side)
        else:
            channels, size = model.patch_embed.proj.in_channels, tuple(model.patch_embed.img_size)
        parameter = next(model.parameters())
        generator = torch.Generator().manual_seed(0)  # a private stream: the training's RNG is not touched
        images = torch.randn(self.throughput_batch, channels, *size, generator=generator)
        return images.to(parameter.device, parameter.dtype)

    @staticmethod
    def _throughput(model: nn.Module, images: Tensor | None) -> float | None:
        return None if images is None else measure_throughput(model, images)

    def _report(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        metrics = {
            "head_pruning/heads": float(sum(entry["heads_per_layer"])),
            "head_pruning/parameters": float(entry["parameters"]),
        }
        if entry["throughput"] is not None:
            metrics["head_pruning/throughput"] = entry["throughput"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        if self._log_dir is not None:
            atomic_write_text(os.path.join(self._log_dir, HISTORY_JSON), json.dumps(self.history, indent=2) + "\n")
        if self.verbose:
            removed = sum(len(heads) for heads in entry["removed"].values())
            speed = (
                ""
                if entry["throughput"] is None
                else (f", {entry['throughput_before']:.1f} -> {entry['throughput']:.1f} images/s")
            )
            rank_zero_info(
                f"HeadPruning at epoch {entry['epoch']}: removed {removed} heads by {entry['criterion']} "
                f"{entry['removed']}; heads per layer now {entry['heads_per_layer']}, parameters "
                f"{entry['parameters_before']:,} -> {entry['parameters']:,}{speed}."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]


def _check_amount(amount: object, allow_zero: bool = False) -> None:
    whole = isinstance(amount, int) and not isinstance(amount, bool) and amount >= (0 if allow_zero else 1)
    fraction = isinstance(amount, float) and (0.0 < amount < 1.0 or (allow_zero and amount == 0.0))
    if not (whole or fraction):
        raise ValueError(
            f"`amount` must be a fraction in (0, 1) of the original heads or a number of heads >= 1, got {amount!r}."
        )


def _parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
