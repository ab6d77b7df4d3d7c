"""The main job: fine-tune a timm ViT with [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] and log GMAR maps
and head importance.

``examples/finetune_vit.py`` and ``gmar-lightning demo`` both run [`run_demo`][gmar_lightning.demos.job.run_demo]. By
default it trains a small ViT (4 layers, 96 wide, 4 heads, patch 8, 64 px) from scratch on the synthetic
[`ShapesDataset`][gmar_lightning.demos.data.ShapesDataset], which reaches 0.9 validation accuracy (and stops there) in
about three minutes on 2 CPU cores; ``--data-dir`` switches to an ``ImageFolder`` with ``train/`` and ``val/``
subfolders and ``--model`` to any timm model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import netrc
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from typing_extensions import override

from gmar_lightning._checks import parse_methods
from gmar_lightning.callback import GMARCallback
from gmar_lightning.demos.config import DEFAULT_IMG_SIZE, DEFAULT_MODEL, DEFAULT_MODEL_KWARGS, LOGGERS, DemoConfig
from gmar_lightning.demos.data import HorizontalFlipWithMask, ShapesDataModule
from gmar_lightning.demos.image_folder import ImageFolderDataModule
from gmar_lightning.demos.model import ViTClassifier
from gmar_lightning.model_loading import checkpoint_model_settings
from gmar_lightning.trajectory import TRAJECTORY_NPZ

__all__ = ["TENSORBOARD_SAMPLES", "run_demo"]

RUN_NAME = "gmar_demo"

TENSORBOARD_SAMPLES = "--samples_per_plugin images=1000"
"""TensorBoard keeps only 10 images per tag, sampled at random, unless told to keep more: with this, the slider shows
every evaluation (up to 1000), the first one included. (``images=0``, once "keep all", makes TensorBoard 2.21 show no
image at all.)"""


def _model_spec(config: DemoConfig) -> tuple[str, dict[str, Any], int | None]:
    """The timm name, constructor overrides and image size the run builds its model with."""
    if config.model is None:
        return DEFAULT_MODEL, {**DEFAULT_MODEL_KWARGS, **config.model_kwargs}, config.img_size or DEFAULT_IMG_SIZE
    return config.model, dict(config.model_kwargs), config.img_size


def _input_size(model: torch.nn.Module) -> int:
    """The square input side a timm model was built for."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return int(img_size[0])
    return int(model.pretrained_cfg["input_size"][-1])


def _wandb_is_configured() -> bool:
    """Whether the user set W&B up (an API key in the environment or in ~/.netrc, or an explicit mode)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _make_logger(config: DemoConfig) -> tuple[Logger, Path]:
    """The Lightning logger and the run's own directory, which holds its checkpoints (and, but for W&B, its
    trajectory files); two runs never share it."""
    if config.logger == "tensorboard":
        logger: Logger = TensorBoardLogger(config.log_dir, name=RUN_NAME)
        return logger, Path(logger.log_dir)
    if config.logger == "csv":
        logger = CSVLogger(config.log_dir, name=RUN_NAME)
        return logger, Path(logger.log_dir)
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("`--logger wandb` needs wandb; pip install wandb (or pip install -e '.[wandb]' in the clone).")
    if not _wandb_is_configured():
        # Without credentials W&B would prompt for a login; offline runs can be synced later with `wandb sync`.
        os.environ["WANDB_MODE"] = "offline"
    Path(config.log_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project="gmar-lightning", name=RUN_NAME, save_dir=config.log_dir)
    # The run's folder (wandb/<offline-)run-...>), not the save_dir every run shares; its files/ subfolder holds the
    # trajectory files W&B uploads.
    return logger, Path(logger.experiment.dir).parent


def _make_data(config: DemoConfig, model: torch.nn.Module, num_classes: int) -> L.LightningDataModule:
    """The datamodule; its ``input_recipe`` gives the callback (and the checkpoints) the normalisation and class
    names."""
    img_size = _input_size(model)
    if config.data_dir is None:
        shapes = ShapesDataModule(
            num_train=config.max_train_images or 3000,
            num_val=config.max_val_images or 500,
            image_size=img_size,
            num_classes=num_classes,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            seed=config.seed,
            cache=True,  # rendering costs ~2 ms an image: once, not once per epoch
        )
        shapes.train_dataset = HorizontalFlipWithMask(shapes.train_dataset)
        return shapes
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(model)
    return ImageFolderDataModule(
        config.data_dir,
        img_size,
        tuple(data_config["mean"]),
        tuple(data_config["std"]),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        max_train_images=config.max_train_images,
        max_val_images=config.max_val_images,
        seed=config.seed,
    )


def _num_classes(config: DemoConfig) -> int:
    if config.data_dir is None:
        return 4
    train_dir = Path(config.data_dir) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"`--data-dir` {config.data_dir!r} has no train/ folder; lay images out as train/<class>/<image>."
        )
    classes = [entry for entry in train_dir.iterdir() if entry.is_dir()]
    if len(classes) < 2:
        raise ValueError(f"`--data-dir` {config.data_dir!r} needs at least 2 class folders under train/.")
    return len(classes)


class _LastOnException(L.Callback):
    """Save ``last.ckpt`` when the fit stops on an exception (Ctrl-C, SIGTERM, a crash), and leave it in place.

    Not Lightning's ``OnExceptionCheckpoint``: with one in the callbacks, ``fit`` looks for a checkpoint to resume
    from (``ckpt_path="last"``) and warns twice at the start of every new run, and it deletes its file at the end of
    a normal fit, which here would be the ``last.ckpt`` that ``ModelCheckpoint`` just wrote.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        trainer.save_checkpoint(self.path)


class _KeyboardInterruptAgain(L.Callback):
    """Raise ``KeyboardInterrupt`` at the next batch once a Ctrl-C arrived (``interrupted`` is set), in case Python
    swallowed the first: a ``KeyboardInterrupt`` raised while a finaliser or weakref callback runs is printed as
    "Exception ignored in ..." and lost, and the fit would go on as if the key had never been pressed."""

    def __init__(self, interrupted: threading.Event) -> None:
        self.interrupted = interrupted

    def _raise_if_interrupted(self) -> None:
        if self.interrupted.is_set():
            raise KeyboardInterrupt

    @override
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._raise_if_interrupted()

    @override
    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._raise_if_interrupted()


@contextlib.contextmanager
def _noting_interrupts(interrupted: threading.Event) -> Iterator[None]:
    """While the block runs in the main thread, Ctrl-C (SIGINT) sets ``interrupted`` and then raises
    ``KeyboardInterrupt`` as Python's own handler does; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not (
        signal.default_int_handler
    ):
        yield  # another thread, or a handler of someone else's (or SIGINT ignored): left as it is
        return

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.set()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _devices(value: str) -> str | int | list[int]:
    """``--devices`` as Lightning expects it: ``"auto"``, a count, or a list of indices for ``"0,1"``."""
    if "," in value:
        return [int(index) for index in value.split(",") if index.strip()]
    return int(value) if value.lstrip("-").isdigit() else value


def _start_from(checkpoint: str | None, module: ViTClassifier, run_dir: Path) -> tuple[str | None, str | None]:
    """What ``--checkpoint`` does, as ``(ckpt_path for trainer.fit, the one line that says it)``.

    A demo checkpoint of the same model (``last.ckpt``, also one an interrupt left) resumes the run: epochs,
    optimizer, schedule and the GMAR probe and history. Any other weights file only initialises the model.
    """
    if checkpoint is None:
        return None, None
    settings = checkpoint_model_settings(checkpoint)
    current = {key: module.hparams[key] for key in settings or {}}
    if settings is not None and settings == current:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if "loops" in state:
            return checkpoint, (
                f"Resuming {checkpoint} from epoch {state.get('epoch', 0)}, step {state.get('global_step', 0)} "
                f"(optimizer, schedule and GMAR history included), logging to {run_dir}."
            )
    return None, f"Starting from the weights in {checkpoint} at epoch 0 (it is not a demo checkpoint of this model)."


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Fine-tune a ViT with [`GMARCallback`][gmar_lightning.callback.gmar.GMARCallback] and return where everything
    went.

    Args:
        config: The run's settings.

    Returns:
        ``{"val_acc", "val_loss", "log_dir", "trajectory_path", "checkpoint_path", "wall_time_s",
        "tensorboard_command", "view_command", "config"}``; paths are strings. ``view_command`` is how to look at
        the logs (``tensorboard --logdir ... --samples_per_plugin images=1000``, ``wandb sync ...`` or
        ``gmar-lightning report ...``); ``tensorboard_command`` is the same for TensorBoard and ``None`` for other
        loggers.

    Raises:
        ValueError: For an unknown model name, bad options or data folders.
        FileNotFoundError: For a missing data folder or checkpoint.
    """
    if config.logger not in LOGGERS:
        raise ValueError(f"`--logger` must be one of {', '.join(LOGGERS)}, got {config.logger!r}.")
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise FileNotFoundError(f"`--checkpoint` {config.checkpoint!r} does not exist; pass a weights file.")
    if config.target_acc is not None and not 0.0 < config.target_acc <= 1.0:
        raise ValueError(
            f"`--target-acc` must lie in (0, 1], or be None to train every epoch; got {config.target_acc}."
        )
    methods = parse_methods(config.methods)
    L.seed_everything(config.seed, workers=True, verbose=False)
    model_name, model_kwargs, img_size = _model_spec(config)
    num_classes = _num_classes(config)
    module = ViTClassifier(
        model_name=model_name,
        num_classes=num_classes,
        img_size=img_size,
        pretrained=config.pretrained,
        checkpoint_path=config.checkpoint,
        model_kwargs=model_kwargs,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    datamodule = _make_data(config, module.model, num_classes)
    logger, run_dir = _make_logger(config)
    gmar = GMARCallback(
        num_probe=config.num_probe,
        methods=methods,
        every_n_epochs=config.every_n_epochs,
        cmap=config.cmap,
        alpha=config.alpha,
        mode=config.mode,
        outlier_percentile=config.outlier_percentile,
    )
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0)
    # Ctrl-C, SIGTERM or a crash saves the state reached as last.ckpt, so `--checkpoint` can resume from there.
    on_interrupt = _LastOnException(checkpoint_dir / "last.ckpt")
    interrupted = threading.Event()
    callbacks: list[L.Callback] = [gmar, checkpoint, on_interrupt, _KeyboardInterruptAgain(interrupted)]
    if config.target_acc is not None:
        # Patience longer than the run: only the threshold stops it.
        callbacks.append(
            EarlyStopping("val_acc", mode="max", stopping_threshold=config.target_acc, patience=config.epochs + 1)
        )
    trainer_options: dict[str, Any] = {}
    if config.precision is not None:
        trainer_options["precision"] = config.precision
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=_devices(config.devices),
        strategy=config.strategy,
        logger=logger,
        callbacks=callbacks,
        # Every 10 steps, or once an epoch on data too small for that (Lightning warns about a longer interval).
        log_every_n_steps=max(1, min(10, math.ceil(len(datamodule.train_dataset) / config.batch_size))),
        enable_progress_bar=config.progress_bar,
        **trainer_options,
    )
    trajectory_dir = Path(logger.experiment.dir) if isinstance(logger, WandbLogger) else run_dir
    resume, start = _start_from(config.checkpoint, module, run_dir)
    if start is not None and trainer.is_global_zero:
        print(start)
    started = time.perf_counter()
    try:
        with _noting_interrupts(interrupted):
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SystemExit as stop:
        # Lightning ends a fit on Ctrl-C with exit status 1 and on SIGTERM with SIGTERMException, a SystemExit of 0;
        # an interrupted run must not look like a finished one.
        if trainer.is_global_zero:
            print(f"\nInterrupted. Kept: {checkpoint_dir / 'last.ckpt'} and {trajectory_dir / TRAJECTORY_NPZ}")
        raise SystemExit(stop.code or 128 + signal.SIGTERM) from None
    wall_time = time.perf_counter() - started
    metrics = trainer.callback_metrics
    epochs_run = trainer.current_epoch
    trajectory_path = trajectory_dir / TRAJECTORY_NPZ
    view_command = f"tensorboard --logdir {run_dir} {TENSORBOARD_SAMPLES}"
    if isinstance(logger, WandbLogger):
        view_command = f"wandb sync {run_dir}" if os.environ.get("WANDB_MODE") == "offline" else logger.experiment.url
    elif isinstance(logger, CSVLogger):
        view_command = f"gmar-lightning report {run_dir}"
    result: dict[str, Any] = {
        "val_acc": float(metrics["val_acc"]) if "val_acc" in metrics else None,
        "val_loss": float(metrics["val_loss"]) if "val_loss" in metrics else None,
        "log_dir": str(run_dir),
        "trajectory_path": str(trajectory_path) if trajectory_path.is_file() else None,
        "checkpoint_path": str(checkpoint_dir / "last.ckpt"),
        "wall_time_s": wall_time,
        "epochs": epochs_run,
        "stopped_early": epochs_run < config.epochs,
        "tensorboard_command": view_command if config.logger == "tensorboard" else None,
        "view_command": view_command,
        "config": asdict(config),
    }
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # the demo owns its run: a second demo in this process gets a new one
    if trainer.is_global_zero:
        if result["stopped_early"] and config.target_acc is not None:
            print(
                f"\nStopped after epoch {epochs_run} of {config.epochs}: val_acc reached the target "
                f"{config.target_acc} (--target-acc 0 trains every epoch)."
            )
        _print_summary(result)
    return result


def _print_summary(result: dict[str, Any]) -> None:
    accuracy = "n/a" if result["val_acc"] is None else f"{result['val_acc']:.3f}"
    print(f"\nval_acc {accuracy} after {result['wall_time_s']:.0f} s")
    print(f"Logs:       {result['log_dir']}")
    print(f"Heads:      {result['trajectory_path']}")
    print(f"Checkpoint: {result['checkpoint_path']}")
    print(f"View them:  {result['view_command']}")
    if result["tensorboard_command"] is not None:
        print("            (images=1000 keeps every evaluation's images; by default TensorBoard keeps 10 at random)")
    print(f"Report:     gmar-lightning report {result['log_dir']}")
