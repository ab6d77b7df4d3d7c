"""GMARCallback: explain a fixed probe batch at the end of validation and log maps and head importance.

The callback owns the schedule, the probe batch and the head-importance trajectory. The explanation is
[`gmar_lightning.explain`][gmar_lightning.engine.explain], what gets logged is
[`gmar_lightning.callback.records.evaluation_record`][gmar_lightning.callback.records.evaluation_record], and where it
goes is [`gmar_lightning.callback.sinks`][gmar_lightning.callback.sinks]. It never changes the training it observes:
the engine restores the model's flags and the RNG state, probe samples are copied, and nothing here touches gradients,
the optimizer or the data order. The model is resolved once per fit
([`resolve_model`][gmar_lightning.resolve.resolve_model]), again only when its ViT changes structure.

State belongs to one run: a callback object attached to a new ``Trainer`` starts afresh (a new probe, an empty
trajectory) unless the run resumes from a checkpoint, which restores both. ``trainer.validate()`` runs are recorded
apart from the fit (tags ``gmar_validate/...``, files ``head_importance_validate.*``) and never change its history.
"""

from __future__ import annotations

import contextlib
import random
import re
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import default_collate
from typing_extensions import override

from gmar_lightning import families
from gmar_lightning._checks import check_positive_int, one_line
from gmar_lightning.callback.records import (
    METRICS,
    EvaluationRecord,
    MapHistory,
    Probe,
    evaluation_record,
    probe_metric_scores,
)
from gmar_lightning.callback.sinks import Sink, sinks_for_loggers
from gmar_lightning.capture import unwrap_model
from gmar_lightning.engine import explain, explain_many
from gmar_lightning.explanation import GMAR_METHODS, METHODS, Explanation
from gmar_lightning.input_recipe import INPUT_RECIPE_KEY, InputRecipe, datamodule_recipe
from gmar_lightning.naflex import is_naflex_batch, naflex_part, pad_cat
from gmar_lightning.options import ExplainOptions
from gmar_lightning.render import DEFAULT_ALPHA, DEFAULT_CMAP, check_overlay_style
from gmar_lightning.resolve import ResolvedModel, resolve_model
from gmar_lightning.trajectory import TRAJECTORY_STEM, HeadTrajectory

__all__ = ["GMARCallback"]

ProbeInput = Tensor | tuple[Tensor, Tensor] | list[int]
# Images are a tensor [B, C, H, W] or a NaFlex dict of B images (its own keys only).
BatchParts = tuple[Tensor | dict[str, Tensor], Tensor | None, Tensor | None]

_NAME = re.compile(r"[A-Za-z0-9_-]+")

# Strategies whose forward runs collectives (sharded parameters are gathered layer by layer): every rank must explain.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
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


def _split_batch(batch: Any) -> BatchParts:
    """Images, labels and masks from a ``Tensor``, an ``(images, labels[, masks])`` sequence or a dict; a NaFlex dict
    (transformers' processor output, perhaps with ``labels``) or a ``(NaFlex dict, labels)`` pair (timm's NaFlex
    loader) gives its NaFlex tensors as the images."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if is_naflex_batch(batch):
        images: Any = naflex_part(batch)
        labels = next((batch[key] for key in _LABEL_KEYS if key in batch), None)
        masks = None
    elif isinstance(batch, Sequence) and batch and is_naflex_batch(batch[0]):
        images, labels, masks = naflex_part(batch[0]), batch[1] if len(batch) > 1 else None, None
    elif isinstance(batch, Mapping):
        images = next((batch[key] for key in _IMAGE_KEYS if key in batch), None)
        labels = next((batch[key] for key in _LABEL_KEYS if key in batch), None)
        masks = next((batch[key] for key in _MASK_KEYS if key in batch), None)
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        masks = batch[2] if len(batch) > 2 else None
    else:
        images = labels = masks = None
    if not isinstance(images, Tensor) and not is_naflex_batch(images):
        keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
        raise TypeError(
            f"GMARCallback cannot find images in a validation batch of type {type(batch).__name__}{keys}; pass "
            "`unpack_batch=lambda batch: (images, labels, masks)` or `probe=` with the images to explain."
        )
    labels = labels if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point() else None
    masks = masks if isinstance(masks, Tensor) and masks.dim() == 3 else None
    return images, labels, masks


def _indexable(dataset: Any) -> bool:
    """Whether samples can be read by index (a map-style dataset), rather than only by iterating."""
    return dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _cat(parts: list[Any]) -> Any:
    if any(part is None for part in parts):
        return None
    return pad_cat(parts) if isinstance(parts[0], Mapping) else torch.cat(parts)


def _own_copy(part: Any, limit: int | None = None) -> Any:
    """A CPU copy (of a tensor, or of each tensor of a NaFlex dict) that is a normal tensor even when made under
    ``trainer.validate()``'s inference mode, so that a probe taken in a baseline validate can still be explained
    (with gradients) during a later fit."""
    if part is None:
        return None
    if isinstance(part, Mapping):
        return {key: _own_copy(value, limit) for key, value in part.items()}
    with torch.inference_mode(False):
        return part[:limit].detach().cpu().clone()


def _moved(part: Any, device: torch.device) -> Any:
    """A tensor, or each tensor of a NaFlex dict, on ``device``."""
    if isinstance(part, Mapping):
        return {key: value.to(device) for key, value in part.items()}
    return None if part is None else part.to(device)


def _first_loader(loaders: Any) -> Any:
    """The first validation dataloader of a single loader, a list or a dict of them."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        return loaders[0] if loaders else None
    return loaders


def _blank_image(vit: nn.Module) -> Tensor | None:
    """A zero image ``[1, C, H, W]`` of the size and channels the ViT declares (transformers: ``config.image_size``
    and ``num_channels``; timm: ``patch_embed.img_size`` and its first convolution), or ``None`` if it declares none."""
    config = getattr(vit, "config", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    patch_embed = getattr(vit, "patch_embed", None)
    if size is None and isinstance(patch_embed, nn.Module):
        size = getattr(patch_embed, "img_size", None)
        first = next((module for module in patch_embed.modules() if isinstance(module, nn.Conv2d)), None)
        channels = getattr(first, "in_channels", None)
    if size is None or channels is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    parameter = next(vit.parameters(), None)
    floating = parameter is not None and parameter.is_floating_point()
    return torch.zeros(
        1,
        int(channels),
        int(height),
        int(width),
        dtype=parameter.dtype if floating else torch.float32,
        device=parameter.device if parameter is not None else None,
    )


def _logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs validation metrics at, so GMAR values line up with ``val_loss`` in every chart.

    During fit-time validation that is one less than ``trainer.global_step``: Lightning counts the optimizer step
    after validation has run. There is no public accessor; the loggers read this same counter.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def _pruning_steps(trainer: pl.Trainer) -> list[int]:
    """The global steps at which a ``HeadPruning`` callback of this fit removed heads (its ``history``)."""
    from gmar_lightning.callback.head_pruning import HeadPruning  # it imports this module

    return [int(entry["step"]) for c in trainer.callbacks if isinstance(c, HeadPruning) for entry in c.history]


def _retagged(record: EvaluationRecord, prefix: str) -> EvaluationRecord:
    """The record with every leading ``gmar/`` of its tags (also those a line chart draws) replaced by ``prefix``."""

    def tag(name: str) -> str:
        return prefix + name.removeprefix("gmar/")

    renamed = {
        item.name: {tag(key): value for key, value in getattr(record, item.name).items()}
        for item in fields(record)
        if isinstance(getattr(record, item.name), dict)
    }
    renamed["line_charts"] = {tag(chart): [tag(name) for name in tags] for chart, tags in record.line_charts.items()}
    return replace(record, **renamed)


class GMARCallback(Callback):
    r"""Log GMAR explanations and attention-head importance of a ViT at the end of validation.

    At every ``every_n_epochs``-th epoch's validations during ``fit`` (every one of them with
    ``val_check_interval < 1``; never during the sanity check), global rank 0 explains a fixed probe batch with each
    of ``methods``, all from one forward and one backward pass
    ([`explain_many`][gmar_lightning.engine.explain_many]), and logs, under ``gmar/`` at the step of Lightning's own
    validation metrics:

    * ``gmar/overlay/<method>``: probe images 1-2 with the map overlaid, titled with what the map shows, captioned
      with true and predicted class and its probability, with a labelled colour bar;
      ``gmar/overlay/<method>/images_3-4`` and so on for the rest, up to ``max_images``: each image sized so a
      TensorBoard card shows it readable unexpanded;
    * ``gmar/evolution/<method>`` and ``gmar/evolution/<method>/images_3-4``: probe images 1-2 and 3-4 (rows) at up to
      4 evaluations (columns, evenly spaced, always the first and the latest), so every evaluation's effect is
      visible in the latest image;
    * ``gmar/head_weights/layer_XX`` and ``gmar/head_weights/layer_XX/head_YY``: per layer and per head, the histogram
      of head weights across probe images;
    * ``gmar/head_mean/layer_XX/head_YY``: each head's probe-mean weight, drawn as one chart per layer with one line
      per head (TensorBoard's Custom Scalars tab, W&B line series);
    * ``gmar/entropy/layer_XX``, ``gmar/top_head_share/layer_XX``, ``gmar/rank_stability/layer_XX``: specialisation
      scalars (normalised entropy of head weights, share of the top head, Spearman rank correlation of the head order
      with the previous evaluation), also as one chart each with one line per layer;
    * ``gmar/head_importance`` (layers x heads heatmap), ``gmar/trajectory/layer_XX`` (one layer's head weights over
      steps, one coloured line per head named in a legend: Custom Scalars colours lines by run, so its per-layer
      charts cannot) and ``gmar/specialisation/{entropy,top_head_share,rank_stability}`` (one line per layer, on the
      statistic's natural y-range) figures, each sized for a TensorBoard card;
    * ``gmar/metrics/<method>/<metric>`` for each of ``metrics`` the probe makes defined;
    * on W&B also ``gmar/probe/<method>`` (one captioned image per probe image) and ``gmar/head_weights_table``.

    ``trainer.validate()`` explains the probe too, once per call, and logs the same values under ``gmar_validate/``
    with its own trajectory (``validation_trajectory``), so it never adds to or rewrites the fit's history.

    Every logger gets the values in its own run: TensorBoard and W&B natively, MLflow as metrics and artifacts, any
    other logger as metrics through ``logger.log_metrics`` plus files in its run folder; with no logger, files go to a
    new ``<default_root_dir>/gmar/version_N``. The trajectory ([`trajectory`][gmar_lightning.trajectory], one row per
    evaluation keyed by the step Lightning logs ``val_loss`` at, the step of every value logged with it) is the
    probe-mean head weights and raw scores of the first GMAR method in ``methods``; it is saved in checkpoints and
    rewritten as ``head_importance.csv`` and ``head_importance.npz`` after every evaluation, so an interrupted run
    keeps every finished evaluation.

    Args:
        num_probe: How many samples form the probe batch: the first ``num_probe`` samples of the first validation
            dataset (read from the dataset, so the same for 1 and N devices), taken at the first real validation and
            kept for the whole run (also across a resume).
        probe: A fixed probe instead: images ``[B, C, H, W]``, an ``(images, labels)`` pair, or indices into the
            first validation dataset.
        methods: Explanation methods, any of [`gmar_lightning.METHODS`][gmar_lightning.explanation.METHODS]. The
            default logs GMAR's map, which shows where attention carries information (it barely changes with the
            explained class), beside ``grad_rollout``'s, which follows the class and the classifier; GMAR's head
            weights feed the trajectory either way.
        target: Explain the predicted class (``"pred"``) or the label (``"label"``, needs labels in the probe).
        every_n_epochs: Explain in every n-th epoch.
        model_getter: Returns the module to explain from the LightningModule: the ViT, or any module holding it whose
            forward returns logits ``[B, C]`` (a backbone with its head). Default: the outermost ViT inside the
            LightningModule (with a warning naming them when there are several); a ViT without its own classifier
            (``num_classes=0``, a backbone under a separate head) is explained through the LightningModule's
            ``forward``, which must then return logits.
        mean: Per-channel normalisation mean, to show probe images in their true colours (default: the data
            module's ``input_recipe``, else min-max).
        std: Per-channel normalisation std.
        max_images: Most probe images shown per method, two per overlay image.
        class_names: Names for class indices in captions (default: the data module's ``input_recipe``).
        per_head_histograms: Also log one histogram per head (``gmar/head_weights/layer_XX/head_YY``).
        cmap: Matplotlib colour map of the overlays; the default, ``"inferno"``, is perceptually uniform.
        alpha: Weight of the colour-mapped saliency over the image in ``blended`` mode, in ``[0, 1]``.
        mode: How maps are drawn: ``"blended"`` (colour map over the image), ``"masked"`` (the image times the map)
            or ``"heat_map"`` (the colour-mapped map alone).
        outlier_percentile: Saturate each map's top ``outlier_percentile`` % before drawing it, in ``[0, 100)``, so a
            few very bright patches do not leave the rest dark (Captum's ``outlier_perc``).
        metrics: Probe-batch scores to log per method: any of ``pointing_game``, ``energy_pointing_game`` (need
            masks), ``deletion_auc``, ``insertion_auc``.
        save_dir: Root for extra PNG/CSV/NPZ output; each run writes into a new ``<save_dir>/version_N``, in addition
            to its loggers.
        on_error: ``"warn"``: report an error in any hook once, with its traceback, and switch the callback off (or
            only the failing logger's sink) so training goes on; ``"raise"``: re-raise it. The model is restored
            either way.
        explain_options: Options for [`gmar_lightning.explain`][gmar_lightning.engine.explain]: an
            [`ExplainOptions`][gmar_lightning.options.ExplainOptions] or a dict of its fields (``residual``,
            ``head_norm``, ``discard_ratio``, ``start_layer``, ``chunk_size``, ``token_layout``), checked here.
        unpack_batch: Turns one validation batch (or the collated probe samples) into ``images`` or
            ``(images, labels[, masks])``, for batches the default cannot read (a tensor, an
            ``(images, labels[, masks])`` sequence, a dict with keys such as ``images``/``labels``/``masks``, or a
            NaFlex batch: a dict in timm's or transformers' keys, perhaps with ``labels``, or a ``(dict, labels)``
            pair, whose probe images are each drawn at their own size).
        explain_on_all_ranks: Whether every rank explains the same probe in lockstep (rank 0 alone logs), as a model
            whose forward runs collectives needs. ``None``: under ``FSDPStrategy``, ``ModelParallelStrategy``
            (FSDP2) and ``DeepSpeedStrategy``, where sharded parameters are gathered by every rank together; rank 0
            explains alone under any other strategy.
        name: Tells several callbacks in one Trainer apart (e.g. one per ViT, or ``"ema"``): it enters the checkpoint
            ``state_key``, the tags (``gmar_<name>/...``, ``gmar_validate_<name>/...``) and the trajectory files
            (``head_importance_<name>.*``). Two callbacks with the same name (or none) in one Trainer are refused at
            ``setup``.

    With Lightning's ``WeightAveraging``/``EMAWeightAveraging`` the averaged weights that validation ran with are
    explained, in either callback order. Any other callback that swaps weights in for validation and back in its
    ``on_validation_epoch_end`` must be listed after this one: the callback explains the weights the module holds
    when its own ``on_validation_epoch_end`` runs.

    Raises:
        ValueError: If an argument is invalid (checked here) or the model cannot be explained (checked in ``setup``,
            raised only with ``on_error="raise"``).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from gmar_lightning import GMARCallback
        >>> gmar = GMARCallback(num_probe=16, methods=("gmar_l1", "rollout"), unpack_batch=lambda b: (b["img"], b["y"]))
        >>> trainer = Trainer(callbacks=[gmar], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        num_probe: int = 16,
        probe: ProbeInput | None = None,
        methods: Sequence[str] = ("gmar_l1", "grad_rollout"),
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
        mode: str = "blended",
        outlier_percentile: float = 0.0,
        metrics: Sequence[str] = (),
        save_dir: str | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        explain_options: ExplainOptions | dict[str, Any] | None = None,
        unpack_batch: Callable[[Any], Any] | None = None,
        explain_on_all_ranks: bool | None = None,
        name: str | None = None,
    ) -> None:
        check_positive_int("num_probe", num_probe)
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise ValueError(f"`name` must be letters, digits, '_' or '-' (it enters tags and files), got {name!r}.")
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
        if explain_on_all_ranks is not None and not isinstance(explain_on_all_ranks, bool):
            raise TypeError(f"`explain_on_all_ranks` must be True, False or None, got {explain_on_all_ranks!r}.")
        if (mean is None) != (std is None):
            raise ValueError("`mean` and `std` must be given together (or neither, for min-max display).")
        check_overlay_style(cmap, alpha, mode, outlier_percentile)
        for argument, function in (("model_getter", model_getter), ("unpack_batch", unpack_batch)):
            if function is not None and not callable(function):
                raise TypeError(f"`{argument}` must be callable, got {type(function).__name__}.")
        given = explain_options if isinstance(explain_options, Mapping) else {}
        reserved = sorted({"model", "images", "method", "target", "vit"} & given.keys())
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
        self.cmap, self.alpha, self.mode, self.outlier_percentile = cmap, alpha, mode, outlier_percentile
        self.metrics = tuple(metrics)
        self.save_dir = save_dir
        self.on_error = on_error
        self.explain_options = options
        self.unpack_batch = unpack_batch
        self.explain_on_all_ranks = explain_on_all_ranks
        self.name = name
        suffix = "" if name is None else f"_{name}"
        # Tags and file names of fit and validate runs; a name keeps several callbacks in one Trainer apart.
        self._prefixes = {False: f"gmar{suffix}/", True: f"gmar_validate{suffix}/"}
        self._stems = {False: f"{TRAJECTORY_STEM}{suffix}", True: f"{TRAJECTORY_STEM}_validate{suffix}"}
        self.head_method: str | None = next((method for method in methods if method in GMAR_METHODS), None)

        # The probe as given: fixed tensors (a Probe), indices into the validation dataset, or None (the first
        # `num_probe` samples of the first validation dataset).
        self._probe_input: Probe | list[int] | None = self._fixed_probe(probe)
        # Fixed at construction and independent of `methods`: the probe and the history belong to the run, so a run
        # resumed with other methods (or other display options) still finds them in the checkpoint.
        fixed = isinstance(self._probe_input, Probe)
        described = list(self._probe_input.images.shape) if fixed else self._probe_input
        named = {} if name is None else {"name": name}  # unnamed: the key of checkpoints written before `name`
        self._state_key = self._generate_state_key(num_probe=num_probe, probe=described, **named)
        self._trainer: weakref.ReferenceType[pl.Trainer] | None = None
        self.trajectory = HeadTrajectory()
        self.map_history = MapHistory()
        self._start_run()

    def _start_run(self) -> None:
        """Forget everything a previous Trainer left: probe, sinks, warnings, the disabled flag."""
        self.probe: Probe | None = None
        self._pending: list[BatchParts] = []
        self._sinks: list[Sink] | None = None
        self._failing_sinks: set[tuple[int, str]] = set()
        self._disabled = False
        self._checkpoint_step: int | None = None
        self._restoring_fit = True
        self._kept_rows_on_disk = False
        self._warned_several_vits = False
        self._resolved: ResolvedModel | None = None
        self.validation_trajectory = HeadTrajectory()
        self._validation_map_history = MapHistory()

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

    # ------------------------------------------------------------------------------------------------------------
    # error handling
    # ------------------------------------------------------------------------------------------------------------

    def _guarded(self, hook: str, action: Callable[[], None]) -> None:
        """Run one hook's work; with ``on_error="warn"`` an error switches the callback off with one warning."""
        if self._disabled:
            return
        try:
            action()
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._disabled = True
            rank_zero_warn(
                f"GMARCallback disabled itself after an error in `{hook}` ({type(error).__name__}: {one_line(error)}); "
                f"training goes on. Pass on_error='raise' to stop instead.\n{traceback.format_exc()}"
            )

    def _ensure_sinks(self, trainer: pl.Trainer) -> list[Sink]:
        if self._sinks is None:
            self._sinks = sinks_for_loggers(
                trainer.loggers, save_dir=self.save_dir, default_root_dir=trainer.default_root_dir
            )
        return self._sinks

    def _each_sink(self, trainer: pl.Trainer, action: Callable[[Sink], None], what: str = "images") -> None:
        """Apply ``action`` to every sink independently: one failing sink never stops the others.

        With ``on_error="warn"`` a failing sink is reported once and skipped for this evaluation only: it is tried
        again at the next evaluation and at the end of the fit (a disk that was full for a while gets the files
        back). With ``"raise"`` every sink still gets its turn and the first error is raised afterwards. ``what``
        names the kind of write, so that a sink whose images do not fit but whose small trajectory files do is
        reported once, not at every evaluation.
        """
        errors: list[Exception] = []
        for sink in self._ensure_sinks(trainer):
            name, key = type(sink).__name__, (id(sink), what)
            try:
                action(sink)
            except Exception as error:
                if self.on_error == "raise":
                    errors.append(error)
                    continue
                if key not in self._failing_sinks:
                    self._failing_sinks.add(key)
                    rank_zero_warn(
                        f"GMARCallback could not log {what} to {name} ({type(error).__name__}: {one_line(error)}); "
                        f"training and the other loggers go on, and {name} is tried again at the next evaluation and "
                        f"at the end of the fit.\n{traceback.format_exc()}"
                    )
            else:
                if key in self._failing_sinks:
                    self._failing_sinks.discard(key)
                    rank_zero_info(f"GMARCallback: logging {what} to {name} works again.")
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------------------------------------------------
    # setup: one run per Trainer
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._trainer is None or self._trainer() is not trainer:
            # A new Trainer is a new run: nothing of the previous one may leak into it. A resumed fit gets its
            # probe and history back from the checkpoint (load_state_dict runs after setup).
            self._trainer = weakref.ref(trainer)
            self._start_run()
            if stage == "fit":
                self.trajectory = HeadTrajectory()
                self.map_history = MapHistory()
        self._guarded("setup", lambda: self._check_unique_name(trainer))
        self._guarded("setup", lambda: self._setup(trainer, pl_module, stage))

    def _check_unique_name(self, trainer: pl.Trainer) -> None:
        """A second callback with the same ``name`` would write the same tags and files: the later one refuses."""
        earlier = trainer.callbacks[: next(i for i, callback in enumerate(trainer.callbacks) if callback is self)]
        if any(isinstance(callback, GMARCallback) and callback.name == self.name for callback in earlier):
            given = "no `name`" if self.name is None else f"`name={self.name!r}`"
            raise ValueError(
                f"Another GMARCallback in this Trainer also has {given}, so both would write the same tags and "
                "files; give each a distinct `name=` (e.g. name='ema')."
            )

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("GMARCallback: skipped because `fast_dev_run` is on (it runs no real validation).")
            self._disabled = True
            return
        if stage not in ("fit", "validate"):
            return
        self._resolved = self._resolve(pl_module)
        # Sharded parameters may not be whole at setup (DeepSpeed ZeRO-3 partitions them at construction): a blank
        # image is explained there only at the first evaluation.
        self._check_input(self._resolved, blank=not self._all_ranks(trainer))
        if isinstance(self._probe_input, Probe) and self.target == "label" and self._probe_input.labels is None:
            raise ValueError("`target='label'` needs labels: pass `probe=(images, labels)`.")
        if stage == "fit" and trainer.limit_val_batches == 0:
            rank_zero_warn("GMARCallback: `limit_val_batches=0` turns validation off, so nothing will be explained.")

    def _all_ranks(self, trainer: pl.Trainer) -> bool:
        """Whether every rank explains (in lockstep) rather than rank 0 alone."""
        if self.explain_on_all_ranks is not None:
            return self.explain_on_all_ranks
        return type(trainer.strategy).__name__ in _SHARDED_STRATEGIES

    def _check_input(self, resolved: ResolvedModel, blank: bool) -> None:
        """At setup, a forward-only explanation of one image: the probe's first, or a blank image of the size and
        channels the ViT declares. A model whose output is not logits, a probe it cannot take, or ``mean``/``std``
        for another channel count then fail now, in one line, rather than after the first epoch."""
        fixed = self._probe_input if isinstance(self._probe_input, Probe) else None
        image = fixed.images[:1] if fixed is not None else _blank_image(resolved.vit) if blank else None
        if image is None:
            return  # the ViT does not declare its input: the first evaluation checks the probe
        try:
            explain(resolved, image, method="attention", **self.explain_options.as_kwargs())
        except (TypeError, ValueError) as error:
            subject = (
                "`probe` cannot be explained by the model" if fixed is not None else "The model cannot be explained"
            )
            raise ValueError(f"{subject}: {one_line(error)}") from error
        if self.mean is not None and len(self.mean) != image.shape[1]:
            raise ValueError(
                f"`mean` and `std` have {len(self.mean)} values but the model takes {image.shape[1]}-channel images; "
                "pass one value per channel."
            )

    def _resolve(self, pl_module: pl.LightningModule) -> ResolvedModel:
        """The model explained, resolved: the module whose forward gives the logits and the ViT in it whose attention
        counts, checked once (a model that cannot be explained at any image size is refused here)."""
        token_layout = self.explain_options.token_layout
        if self.model_getter is not None:
            chosen = self.model_getter(pl_module)
            if not isinstance(chosen, nn.Module):
                raise TypeError(
                    f"`model_getter` returned {type(chosen).__name__}, not a module; return the ViT (or the module "
                    "holding it that gives logits), e.g. `model_getter=lambda module: module.backbone`."
                )
            return resolve_model(chosen, token_layout=token_layout)
        vit = self._default_vit(pl_module)
        # A backbone without its own classifier outputs features: the LightningModule's forward adds the head.
        classifier = pl_module if families.headless_reason(vit) is not None else vit
        return resolve_model(classifier, vit=vit, token_layout=token_layout)

    def _current_resolution(self, pl_module: pl.LightningModule) -> ResolvedModel:
        """The resolution of `setup`, again only when the ViT changed structure since (e.g. `HeadPruning` removed
        heads): resolving walks the model, and the read-out check costs a forward and backward pass."""
        if self._resolved is None or not self._resolved.is_current():
            self._resolved = self._resolve(pl_module)
        return self._resolved

    def _default_vit(self, pl_module: pl.LightningModule) -> nn.Module:
        found = families.vision_transformers(pl_module)
        if not found:  # the module itself (or a refusal): the check in setup says why it cannot be explained
            return families.find_vision_transformer(pl_module)
        if len(found) > 1 and not self._warned_several_vits:
            self._warned_several_vits = True
            names = ", ".join(f"`{name}`" for name, _ in found)
            rank_zero_warn(
                f"GMARCallback found several ViTs ({names}) and explains the first, `{found[0][0]}`; pass "
                f"`model_getter=lambda module: module.{found[-1][0]}` to choose another."
            )
        return unwrap_model(found[0][1])

    # ------------------------------------------------------------------------------------------------------------
    # the probe
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The validation loaders exist from here on (the sanity check's, before any training, by default): probe
        # indices are checked against the dataset now, not when the first evaluation reads them.
        if isinstance(self._probe_input, list) and self.probe is None and trainer.is_global_zero:
            self._guarded("on_validation_start", lambda: self._check_probe_indices(trainer))

    def _check_probe_indices(self, trainer: pl.Trainer) -> None:
        dataset = getattr(_first_loader(trainer.val_dataloaders), "dataset", None)
        if not _indexable(dataset):
            raise TypeError("`probe=[indices]` needs a validation dataset that supports len() and indexing.")
        outside = [index for index in self._probe_input or [] if index >= len(dataset)]
        if outside:
            raise ValueError(
                f"`probe` indices {outside} are out of range for the first validation dataset of {len(dataset)} "
                f"samples; pass indices below {len(dataset)}."
            )

    def _unpack(self, batch: Any) -> BatchParts:
        if self.unpack_batch is None:
            return _split_batch(batch)
        return _split_batch(self.unpack_batch(batch))

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
        if _indexable(getattr(_first_loader(trainer.val_dataloaders), "dataset", None)):
            return  # the probe is read from the dataset itself, the same on every device count
        self._guarded("on_validation_batch_end", lambda: self._keep_from_batch(batch))

    def _keep_from_batch(self, batch: Any) -> None:
        """For iterable datasets, which cannot be indexed: keep the first samples that rank 0 sees."""
        wanted = self.num_probe - sum(len(Probe(part[0])) for part in self._pending)
        if wanted > 0:
            self._pending.append(tuple(_own_copy(part, wanted) for part in self._unpack(batch)))  # type: ignore[arg-type]

    def _take_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Probe | None:
        if isinstance(self._probe_input, Probe):
            return self._probe_input
        loader = _first_loader(trainer.val_dataloaders)
        dataset = getattr(loader, "dataset", None)
        if isinstance(self._probe_input, list) or _indexable(dataset):
            if not _indexable(dataset):
                raise TypeError("`probe=[indices]` needs a validation dataset that supports len() and indexing.")
            indices = self._probe_input or list(range(min(self.num_probe, len(dataset))))
            if not indices:
                return None
            collate = getattr(loader, "collate_fn", None) or default_collate
            with _preserved_rng(), torch.inference_mode(False):
                batch = collate([dataset[index] for index in indices])
                # The hooks Lightning runs on every batch before the model sees it (normalisation on the device...).
                batch = pl_module.on_before_batch_transfer(batch, 0)
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                batch = pl_module.on_after_batch_transfer(batch, 0)
                probe = Probe(*(_own_copy(part) for part in self._unpack(batch)))  # type: ignore[arg-type]
        elif self._pending:
            # Joined outside inference mode too (a validate run's hook runs in it): the probe stays a normal tensor.
            with torch.inference_mode(False):
                probe = Probe(*(_cat([pending[part] for pending in self._pending]) for part in range(3)))
            self._pending = []
        else:
            return None
        if self._probe_input is None and len(probe) < self.num_probe:
            rank_zero_warn(
                f"GMARCallback: `num_probe={self.num_probe}` but the first validation dataloader gave only "
                f"{len(probe)} samples; explaining those."
            )
        return probe

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._disabled or not (trainer.is_global_zero or self._all_ranks(trainer)):
            return
        validating = trainer.state.fn == TrainerFn.VALIDATING
        if not validating and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        with self._validated_weights(trainer, pl_module):
            self._guarded("on_validation_epoch_end", lambda: self._evaluate(trainer, pl_module, validating))

    @contextlib.contextmanager
    def _validated_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
        """Hold the weights that were validated while explaining, whatever the callback order.

        Lightning's ``WeightAveraging`` (``EMAWeightAveraging``...) swaps the averaged weights in at
        ``on_validation_epoch_start`` and back at ``on_validation_epoch_end``. One listed after this callback swaps
        back after this hook; one listed before has already swapped back, so its averaged weights are swapped in
        again here and out afterwards (a swap is its own inverse: the weights come back bit for bit). Other
        weight-swapping callbacks must be listed after this one (see the guide).
        """
        before: list[Any] = []
        for callback in trainer.callbacks:
            if callback is self:
                break
            # The same condition WeightAveraging swaps under.
            if isinstance(callback, WeightAveraging) and getattr(callback, "_average_model", None) is not None:
                before.append(callback)
        for callback in before:
            callback._swap_models(pl_module)
        try:
            yield
        finally:
            for callback in reversed(before):
                callback._swap_models(pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, validating: bool) -> None:
        if self.probe is None:
            self.probe = self._take_probe(trainer, pl_module)
            if self._all_ranks(trainer):  # rank 0's probe: only rank 0 keeps samples from an iterable dataset
                probe = trainer.strategy.broadcast(self.probe, src=0)
                # Unpickled onto rank 0's device: each rank explains on its own.
                self.probe = (
                    None
                    if probe is None
                    else Probe(**{name: _moved(part, pl_module.device) for name, part in probe.state_dict().items()})
                )
            if self.probe is None:
                return
        probe = self.probe
        resolved = self._current_resolution(pl_module)
        if self.target == "label" and probe.labels is None:
            raise ValueError("`target='label'` but the probe has no labels; use target='pred' or pass labels.")
        targets = probe.labels if self.target == "label" else None
        # Every method from the same forward and backward pass (GMAR's head scores and grad_rollout's relevance
        # reduce the same attention and attention gradient).
        explanations: dict[str, Explanation] = explain_many(
            resolved, probe.images, self.methods, target=targets, **self.explain_options.as_kwargs()
        )
        # One step convention everywhere (trajectory, files, captions, every logger): the step Lightning logs this
        # validation's val_loss at; a validate run of a loaded checkpoint is keyed by the checkpoint's global step.
        step = _logging_step(trainer)
        model_step = self._checkpoint_step if validating and self._checkpoint_step is not None else step
        trajectory = self.validation_trajectory if validating else self.trajectory
        if not validating:
            self._keep_rows_on_disk(trainer)
        if self.head_method is not None:
            head = explanations[self.head_method]
            trajectory.name_layers(head.layer_names)
            trajectory.append(trainer.current_epoch, model_step, head.head_weights, head.head_scores)
        map_history = self._validation_map_history if validating else self.map_history
        display = self._input_recipe(trainer)
        map_history.append(
            trainer.current_epoch, {method: explanation.maps for method, explanation in explanations.items()}
        )
        scores = {
            method: probe_metric_scores(resolved.classifier, probe, explanation, self.metrics)
            for method, explanation in explanations.items()
        }
        if not trainer.is_global_zero:  # the other ranks explained (and scored) in lockstep; rank 0 logs
            return
        record = evaluation_record(
            step=step,
            epoch=trainer.current_epoch,
            probe=probe,
            explanations=explanations,
            trajectory=trajectory,
            head_method=self.head_method,
            map_history=map_history,
            mean=display.mean,
            std=display.std,
            max_images=self.max_images,
            class_names=None if display.class_names is None else list(display.class_names),
            per_head_histograms=self.per_head_histograms,
            metric_scores=scores,
            cmap=self.cmap,
            alpha=self.alpha,
            mode=self.mode,
            outlier_percentile=self.outlier_percentile,
            pruned_at=[] if validating else _pruning_steps(trainer),
        )
        if self._prefixes[validating] != "gmar/":
            record = _retagged(record, self._prefixes[validating])
        self._each_sink(trainer, lambda sink: sink.log_evaluation(record))
        self._save_trajectory(trainer, validating)

    def _keep_rows_on_disk(self, trainer: pl.Trainer) -> None:
        """Once per resumed fit: take back the rows this run's files hold beyond the checkpoint.

        A fit killed after its last checkpoint may have written rows (and TensorBoard events) for validations the
        checkpoint does not hold. Those at or below the checkpoint's step are not repeated by the resumed fit, so
        without this the next write would delete them from the files while TensorBoard keeps them.
        """
        if self._checkpoint_step is None or not self._restoring_fit or self._kept_rows_on_disk:
            return
        self._kept_rows_on_disk = True
        for sink in self._ensure_sinks(trainer):
            folder = getattr(sink, "trajectory_dir", None)
            path = Path(folder) / f"{self._stems[False]}.npz" if folder is not None else None
            if path is None or not path.is_file():
                continue
            try:
                saved = HeadTrajectory.load_npz(path)
            except ValueError:
                continue  # a file cut short by the kill: the checkpoint's rows are all there is
            # Rows carry the step val_loss is logged at, which during fit-time validation lags the global step by
            # the optimizer step that batch made: the validation that follows the checkpoint's own step is logged at
            # one less and ran before the kill; one logged at the checkpoint's step ran after it and is repeated.
            kept = self.trajectory.keep_saved_rows(saved, self._checkpoint_step - 1)
            if kept:
                rank_zero_info(
                    f"GMARCallback: kept {kept} evaluation(s) that {path} holds after the checkpoint's step "
                    f"{self._checkpoint_step} (written before the previous run stopped)."
                )

    def _save_trajectory(self, trainer: pl.Trainer, validating: bool) -> None:
        trajectory = self.validation_trajectory if validating else self.trajectory
        if len(trajectory):
            stem = self._stems[validating]
            self._each_sink(trainer, lambda sink: sink.save_trajectory(trajectory, stem), what="trajectory files")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A sink that failed (a disk full for a while) gets the whole trajectory once more.
        if (
            trainer.is_global_zero
            and self._sinks is not None
            and any(what == "trajectory files" for _, what in self._failing_sinks)
        ):
            self._guarded("on_fit_end", lambda: self._save_trajectory(trainer, validating=False))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sink in self._sinks or []:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The files are rewritten after every evaluation; rewriting them here repairs a pair that an interrupt
        # (Ctrl-C) cut off in the middle of that write.
        if trainer.is_global_zero and self._sinks is not None:
            validating = trainer.state.fn == TrainerFn.VALIDATING
            self._guarded("on_exception", lambda: self._save_trajectory(trainer, validating))

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.probe is None else self.probe.state_dict(),
            "trajectory": self.trajectory.state_dict(),
            "map_history": self.map_history.state_dict(),
        }

    def _input_recipe(self, trainer: pl.Trainer, stored: bool = False) -> InputRecipe:
        """This callback's ``mean``, ``std`` and ``class_names`` in front of the data module's input recipe (for
        display), or behind it (``stored``: the data module states the transform training really used)."""
        own = InputRecipe(mean=self.mean, std=self.std, class_names=self.class_names)
        data = datamodule_recipe(trainer)
        recipe = data.merged_over(own) if stored else own.merged_over(data)
        if recipe.img_size is None and self.probe is not None and isinstance(self.probe.images, Tensor):
            recipe = InputRecipe(img_size=int(self.probe.images.shape[-1])).merged_over(recipe)
        return recipe

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # What `gmar-lightning explain --checkpoint` needs to feed images as training did and to name the classes.
        recipe = self._input_recipe(trainer, stored=True)
        if not recipe.is_empty():
            checkpoint[INPUT_RECIPE_KEY] = recipe.to_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint does not record the step its weights' validation was logged at (one less than its global step
        # when saved at the end of an epoch, the same when saved at the end of validation): its own step keys it.
        self._checkpoint_step = int(checkpoint.get("global_step", trainer.global_step))
        self._restoring_fit = trainer.state.fn == TrainerFn.FITTING

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self.probe = Probe(**state_dict["probe"])
        # Only a resumed fit continues the checkpoint's history; validating a checkpoint must not replace the
        # history of the fit this callback recorded.
        if self._restoring_fit:
            self.trajectory = HeadTrajectory.from_state_dict(state_dict["trajectory"])
            if "map_history" in state_dict:  # checkpoints from before the evolution figure have none
                self.map_history = MapHistory.from_state_dict(state_dict["map_history"])
