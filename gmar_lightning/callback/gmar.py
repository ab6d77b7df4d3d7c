"""GMARCallback: explain a fixed probe batch at the end of validation and log maps and head importance.

The callback owns the schedule, the probe batch and the head-importance trajectory. The explanation is
[`gmar_lightning.explain`][gmar_lightning.engine.explain], what gets logged is
[`gmar_lightning.records.evaluation_record`][gmar_lightning.callback.records.evaluation_record], and where it goes is
`gmar_lightning.sinks`. It never changes the training it observes: the engine restores the model's flags and the RNG
state, probe samples are copied, and nothing here touches gradients, the optimizer or the data order.
"""

from __future__ import annotations

import contextlib
import random
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import default_collate
from typing_extensions import override

from gmar_lightning import families
from gmar_lightning._checks import check_positive_int
from gmar_lightning.callback.records import METRICS, MapHistory, Probe, evaluation_record, probe_metric_scores
from gmar_lightning.callback.sinks import Sink, sinks_for_loggers
from gmar_lightning.capture import find_vision_transformer, unwrap_model
from gmar_lightning.engine import explain
from gmar_lightning.explanation import GMAR_METHODS, METHODS, Explanation
from gmar_lightning.options import ExplainOptions
from gmar_lightning.render import DEFAULT_ALPHA, DEFAULT_CMAP, check_overlay_style
from gmar_lightning.trajectory import HeadTrajectory

__all__ = ["GMARCallback"]

ProbeInput = Tensor | tuple[Tensor, Tensor] | list[int]

_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_IMAGE_KEYS = ("images", "image", "pixel_values", "x", "input")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_MASK_KEYS = ("masks", "mask", "segmentation")


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore torch (CPU and CUDA), Python and NumPy RNG states: dataset access must not shift training's RNG."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Images, labels and masks from a ``Tensor``, an ``(images, labels[, masks])`` sequence or a dict."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        images = next((batch[key] for key in _IMAGE_KEYS if key in batch), None)
        labels = next((batch[key] for key in _LABEL_KEYS if key in batch), None)
        masks = next((batch[key] for key in _MASK_KEYS if key in batch), None)
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        masks = batch[2] if len(batch) > 2 else None
    else:
        images = labels = masks = None
    if not isinstance(images, Tensor):
        raise TypeError(
            f"GMARCallback cannot find images in a validation batch of type {type(batch).__name__}; pass `probe=` "
            "with the images to explain."
        )
    labels = labels if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point() else None
    masks = masks if isinstance(masks, Tensor) and masks.dim() == 3 else None
    return images, labels, masks


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if any(part is None for part in parts) else torch.cat(parts)  # type: ignore[arg-type]


class GMARCallback(Callback):
    r"""Log GMAR explanations and attention-head importance of a ViT at the end of validation.

    At every ``every_n_epochs``-th validation (never during the sanity check, and also under ``trainer.validate()``),
    global rank 0 explains a fixed probe batch with each of ``methods`` on the unwrapped model and logs, under
    ``gmar/`` at ``trainer.global_step``:

    * ``gmar/overlay/<method>``: a grid of probe images with the map overlaid and a colour bar, captioned with true
      and predicted class and its probability;
    * ``gmar/evolution/<method>``: the first 4 probe images (rows) at up to 5 evaluations (columns, evenly spaced,
      always the first and the latest), so every evaluation's effect is visible in the latest image;
    * ``gmar/head_weights/layer_XX`` and ``gmar/head_weights/layer_XX/head_YY``: per layer and per head, the histogram
      of head weights across probe images;
    * ``gmar/head_mean/layer_XX/head_YY``: each head's probe-mean weight, drawn as one chart per layer with one line
      per head (TensorBoard's Custom Scalars tab, W&B line series);
    * ``gmar/entropy/layer_XX``, ``gmar/top_head_share/layer_XX``, ``gmar/rank_stability/layer_XX``: specialisation
      scalars (normalised entropy of head weights, share of the top head, Spearman rank correlation of the head order
      with the previous evaluation), also as one chart each with one line per layer;
    * ``gmar/head_importance`` (layers x heads heatmap), ``gmar/trajectory`` (head weights over epochs, one panel per
      layer) and ``gmar/specialisation`` (the three statistics on their natural y-ranges) figures;
    * ``gmar/metrics/<method>/<metric>`` for each of ``metrics`` the probe makes defined;
    * on W&B also ``gmar/probe/<method>`` (one captioned image per probe image) and ``gmar/head_weights_table``.

    TensorBoard and W&B loggers are served natively; with neither, PNG/CSV/NPZ files go to ``save_dir`` (default
    ``<trainer.log_dir>/gmar``). The trajectory ([`trajectory`][gmar_lightning.trajectory]) is the probe-mean head
    weights and raw scores of the first GMAR method in ``methods``; it is saved in checkpoints and written as
    ``head_importance.csv`` and ``head_importance.npz`` into the log directory when fit or validate ends.

    Args:
        num_probe: How many samples of the first validation dataloader form the probe batch, taken at the first real
            validation and kept for the whole run (also across a resume).
        probe: A fixed probe instead: images ``[B, C, H, W]``, an ``(images, labels)`` pair, or indices into the
            first validation dataset.
        methods: Explanation methods, any of [`gmar_lightning.METHODS`][gmar_lightning.explanation.METHODS].
        target: Explain the predicted class (``"pred"``) or the label (``"label"``, needs labels in the probe).
        every_n_epochs: Explain every n-th validation epoch.
        model_getter: Returns the ViT to explain from the LightningModule; default: the outermost submodule with a
            ``patch_embed`` and attention layers.
        mean: Per-channel normalisation mean, to show probe images in their true colours (default: min-max).
        std: Per-channel normalisation std.
        max_images: Most probe images in each overlay grid.
        class_names: Names for class indices in captions.
        per_head_histograms: Also log one histogram per head (``gmar/head_weights/layer_XX/head_YY``).
        cmap: Matplotlib colour map of the overlays; the default, ``"inferno"``, is perceptually uniform.
        alpha: Opacity of the colour-mapped saliency over the image, in ``[0, 1]``.
        metrics: Probe-batch scores to log per method: any of ``pointing_game``, ``energy_pointing_game`` (need
            masks), ``deletion_auc``, ``insertion_auc``.
        save_dir: Directory for PNG/CSV/NPZ output; given, it is written in addition to TensorBoard or W&B.
        on_error: ``"warn"``: report an error in explaining or logging once, with its traceback, and disable the
            callback so training goes on; ``"raise"``: re-raise it. The model is restored either way.
        explain_options: Options for [`gmar_lightning.explain`][gmar_lightning.engine.explain]: an
            [`ExplainOptions`][gmar_lightning.options.ExplainOptions] or a dict of its fields (``residual``,
            ``head_norm``, ``discard_ratio``, ``start_layer``, ``chunk_size``, ``token_layout``), checked here.

    Raises:
        ValueError: If an argument is invalid (checked here) or the model cannot be explained (checked in ``setup``).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from gmar_lightning import GMARCallback
        >>> gmar = GMARCallback(num_probe=16, methods=("gmar_l1", "rollout"))
        >>> trainer = Trainer(callbacks=[gmar], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        num_probe: int = 16,
        probe: ProbeInput | None = None,
        methods: Sequence[str] = ("gmar_l1",),
        target: Literal["pred", "label"] = "pred",
        every_n_epochs: int = 1,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        max_images: int = 16,
        class_names: Sequence[str] | None = None,
        per_head_histograms: bool = True,
        cmap: str = DEFAULT_CMAP,
        alpha: float = DEFAULT_ALPHA,
        metrics: Sequence[str] = (),
        save_dir: str | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        explain_options: ExplainOptions | dict[str, Any] | None = None,
    ) -> None:
        check_positive_int("num_probe", num_probe)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("max_images", max_images)
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        unknown = [method for method in methods if method not in METHODS]
        if not methods or unknown:
            raise ValueError(f"`methods` must be a non-empty list of {', '.join(METHODS)}; got unknown {unknown}.")
        unknown_metrics = [name for name in metrics if name not in METRICS]
        if isinstance(metrics, str) or unknown_metrics:
            raise ValueError(f"`metrics` must be a list of {', '.join(METRICS)}; got {metrics!r}.")
        if target not in ("pred", "label"):
            raise ValueError(f"`target` must be 'pred' or 'label', got {target!r}.")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"`on_error` must be 'warn' or 'raise', got {on_error!r}.")
        if (mean is None) != (std is None):
            raise ValueError("`mean` and `std` must be given together (or neither, for min-max display).")
        check_overlay_style(cmap, alpha)
        if model_getter is not None and not callable(model_getter):
            raise TypeError(f"`model_getter` must be callable, got {type(model_getter).__name__}.")
        given = explain_options if isinstance(explain_options, Mapping) else {}
        reserved = sorted({"model", "images", "method", "target"} & given.keys())
        if reserved:
            raise ValueError(f"`explain_options` must not contain {reserved}; use the callback's arguments.")
        options = ExplainOptions.from_mapping(explain_options)

        self.num_probe = num_probe
        self.methods = methods
        self.target = target
        self.every_n_epochs = every_n_epochs
        self.model_getter = model_getter
        self.mean, self.std = mean, std
        self.max_images = max_images
        self.class_names = list(class_names) if class_names is not None else None
        self.per_head_histograms = per_head_histograms
        self.cmap, self.alpha = cmap, alpha
        self.metrics = tuple(metrics)
        self.save_dir = save_dir
        self.on_error = on_error
        self.explain_options = options
        self.head_method: str | None = next((method for method in methods if method in GMAR_METHODS), None)

        self.trajectory = HeadTrajectory()
        self.map_history = MapHistory()
        self.probe: Probe | None = None
        # The probe as given: fixed tensors (a Probe), indices into the validation dataset, or None (the first
        # validation batches).
        self._probe_input: Probe | list[int] | None = self._fixed_probe(probe)
        # Fixed at construction: the key must not change when a resumed run's probe comes from the checkpoint.
        fixed = isinstance(self._probe_input, Probe)
        described = list(self._probe_input.images.shape) if fixed else self._probe_input
        self._state_key = self._generate_state_key(methods=methods, num_probe=num_probe, probe=described)
        self._pending: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        self._sinks: list[Sink] | None = None
        self._log_dir: str | None = None
        self._disabled = False

    @staticmethod
    def _fixed_probe(probe: ProbeInput | None) -> Probe | list[int] | None:
        if probe is None:
            return None
        if isinstance(probe, Tensor):
            return Probe(probe.detach().cpu().clone())
        if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(part, Tensor) for part in probe):
            images, labels = probe
            if labels.shape != (images.shape[0],):
                raise ValueError(f"`probe` labels must have shape [{images.shape[0]}], got {list(labels.shape)}.")
            return Probe(images.detach().cpu().clone(), labels.detach().cpu().long().clone())
        if isinstance(probe, Sequence) and probe and all(isinstance(i, int) and i >= 0 for i in probe):
            return list(probe)
        raise TypeError(
            "`probe` must be images [B, C, H, W], an (images, labels) pair of tensors, or a list of dataset indices."
        )

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = self.model_getter(pl_module) if self.model_getter is not None else find_vision_transformer(pl_module)
        return unwrap_model(model)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy in _UNSUPPORTED_STRATEGIES:
            raise ValueError(
                f"GMARCallback does not support {strategy}: sharded parameters cannot be explained on rank 0 alone; "
                "use strategy='ddp' (or remove the callback)."
            )
        # trainer.log_dir broadcasts from rank 0, so read it here, where every rank takes part, never on rank 0 alone.
        self._log_dir = trainer.log_dir
        model = self._model(pl_module)
        families.check_supported(model)
        if isinstance(self._probe_input, Probe):
            try:  # a forward-only explanation of one image checks that the model takes the probe images
                explain(model, self._probe_input.images[:1], method="attention", **self.explain_options.as_kwargs())
            except (TypeError, ValueError) as error:
                raise ValueError(f"`probe` cannot be explained by the model: {error}") from error
            if self.target == "label" and self._probe_input.labels is None:
                raise ValueError("`target='label'` needs labels: pass `probe=(images, labels)`.")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.probe is not None or self._probe_input is not None or self._disabled:
            return
        if trainer.sanity_checking or dataloader_idx != 0 or not trainer.is_global_zero:
            return
        taken = sum(len(part[0]) for part in self._pending)
        if taken >= self.num_probe:
            return
        images, labels, masks = _split_batch(batch)
        wanted = self.num_probe - taken
        self._pending.append(
            tuple(None if part is None else part[:wanted].detach().cpu().clone() for part in (images, labels, masks))
        )

    def _take_probe(self, trainer: pl.Trainer) -> Probe | None:
        if isinstance(self._probe_input, Probe):
            return self._probe_input
        if isinstance(self._probe_input, list):
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, Sequence) else loaders
            with _preserved_rng():
                samples = [loader.dataset[index] for index in self._probe_input]
            return Probe(*_split_batch(default_collate(samples)))
        if not self._pending:
            return None
        probe = Probe(*(_cat([pending[part] for pending in self._pending]) for part in range(3)))
        self._pending = []
        if len(probe) < self.num_probe:
            rank_zero_warn(
                f"GMARCallback: `num_probe={self.num_probe}` but the first validation dataloader gave only "
                f"{len(probe)} samples; explaining those."
            )
        return probe

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._disabled or not trainer.is_global_zero:
            return
        validating_only = trainer.state.fn == TrainerFn.VALIDATING
        if not validating_only and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        try:
            if self.probe is None:
                self.probe = self._take_probe(trainer)
                if self.probe is None:
                    return
            self._evaluate(trainer, pl_module, self.probe)
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._disabled = True
            rank_zero_warn(
                f"GMARCallback disabled itself after an error ({type(error).__name__}: {error}); training goes on. "
                f"Pass on_error='raise' to stop instead.\n{traceback.format_exc()}"
            )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        model = self._model(pl_module)
        if self.target == "label" and probe.labels is None:
            raise ValueError("`target='label'` but the probe has no labels; use target='pred' or pass labels.")
        targets = probe.labels if self.target == "label" else None
        explanations: dict[str, Explanation] = {
            method: explain(model, probe.images, method=method, target=targets, **self.explain_options.as_kwargs())
            for method in self.methods
        }
        if self.head_method is not None:
            head = explanations[self.head_method]
            self.trajectory.name_layers(head.layer_names)
            self.trajectory.append(trainer.current_epoch, trainer.global_step, head.head_weights, head.head_scores)
        self.map_history.append(
            trainer.current_epoch, {method: explanation.maps for method, explanation in explanations.items()}
        )
        scores = {
            method: probe_metric_scores(model, probe, explanation, self.metrics)
            for method, explanation in explanations.items()
        }
        record = evaluation_record(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            probe=probe,
            explanations=explanations,
            trajectory=self.trajectory,
            head_method=self.head_method,
            map_history=self.map_history,
            mean=self.mean,
            std=self.std,
            max_images=self.max_images,
            class_names=self.class_names,
            per_head_histograms=self.per_head_histograms,
            metric_scores=scores,
            cmap=self.cmap,
            alpha=self.alpha,
        )
        for sink in self._sinks_for(trainer):
            sink.log_evaluation(record)

    def _sinks_for(self, trainer: pl.Trainer) -> list[Sink]:
        if self._sinks is None:
            self._sinks = sinks_for_loggers(trainer.loggers, save_dir=self.save_dir, log_dir=self._log_dir)
        return self._sinks

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or not len(self.trajectory) or (self._disabled and self._sinks is None):
            return
        try:
            for sink in self._sinks_for(trainer):
                sink.finalize(self.trajectory)
        except Exception:
            if self.on_error == "raise":
                raise
            rank_zero_warn(f"GMARCallback could not write the head-importance files:\n{traceback.format_exc()}")
        finally:
            self._sinks = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.probe is None else self.probe.state_dict(),
            "trajectory": self.trajectory.state_dict(),
            "map_history": self.map_history.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self.probe = Probe(**state_dict["probe"])
            self._probe_input = None
        self.trajectory = HeadTrajectory.from_state_dict(state_dict["trajectory"])
        if "map_history" in state_dict:  # checkpoints from before the evolution figure have none
            self.map_history = MapHistory.from_state_dict(state_dict["map_history"])
