"""Where GMARCallback's history goes, and that it survives: per-run folders for W&B and file runs, MLflow's file
store, any Lightning logger, a read-only folder under one sink, real SIGINT/SIGTERM and SIGKILL."""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from typing_extensions import override

from gmar_lightning import GMARCallback
from gmar_lightning.callback.sinks import write_trajectory
from gmar_lightning.trajectory import HeadTrajectory
from tests.lightning_helpers import TinyViTModule, tiny_data, trainer_kwargs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, callback: GMARCallback, logger, max_epochs: int = 2, **overrides) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        callbacks=[callback], logger=logger, **trainer_kwargs(tmp_path, max_epochs=max_epochs, **overrides)
    )
    trainer.fit(TinyViTModule(), datamodule=tiny_data())
    return trainer


def csv_steps(path: Path) -> list[int]:
    with path.open(newline="") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle)})


# ---------------------------------------------------------------------------------------------------------------
# items 6 and 7: every run has its own folder; scalars and files reach every kind of logger
# ---------------------------------------------------------------------------------------------------------------


def test_two_wandb_runs_with_one_save_dir_keep_their_own_trajectory(tmp_path: Path, offline_wandb: ModuleType) -> None:
    from lightning.pytorch.loggers import WandbLogger

    saved: list[tuple[Path, bytes]] = []
    for run in range(2):
        logger = WandbLogger(save_dir=str(tmp_path / "shared"), offline=True, project="gmar-test")
        callback = GMARCallback(num_probe=4)
        fit(tmp_path / f"run{run}", callback, logger, max_epochs=run + 1)
        files_dir = Path(logger.experiment.dir)
        offline_wandb.finish()
        npz = files_dir / "head_importance.npz"
        assert npz.is_file() and not npz.is_symlink()
        saved.append((npz, npz.read_bytes()))
    (first, first_bytes), (second, _) = saved
    assert first.parent != second.parent
    assert first.read_bytes() == first_bytes  # run 2 did not overwrite run 1
    assert [len(HeadTrajectory.load_npz(path)) for path, _ in saved] == [1, 2]
    assert not list((tmp_path / "shared").glob("head_importance*"))


def test_mlflow_file_store_gets_metrics_and_artifacts_and_stays_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to its file store
    store = tmp_path / "mlruns"
    logger = MLFlowLogger(experiment_name="gmar-test", save_dir=str(store))
    fit(tmp_path, GMARCallback(num_probe=4), logger)
    logger.finalize("success")

    client = MlflowClient(logger._tracking_uri)
    assert sorted(experiment.name for experiment in client.search_experiments()) == ["Default", "gmar-test"]
    assert sorted(path.name for path in store.iterdir()) == sorted([".trash", "0", logger.experiment_id])
    val_steps = [metric.step for metric in client.get_metric_history(logger.run_id, "val_loss")]
    assert val_steps == [2, 5]
    assert [metric.step for metric in client.get_metric_history(logger.run_id, "gmar/entropy/layer_00")] == val_steps
    artifacts = {artifact.path for artifact in client.list_artifacts(logger.run_id)}
    assert {"head_importance.csv", "head_importance.npz", "gmar"} <= artifacts
    steps = {artifact.path for artifact in client.list_artifacts(logger.run_id, "gmar")}
    assert steps == {"gmar/step_000002", "gmar/step_000005"}
    local = client.download_artifacts(logger.run_id, "head_importance.npz", str(tmp_path / "download"))
    assert HeadTrajectory.load_npz(local).steps == [2, 5]


def test_csv_logger_gets_the_scalars_in_metrics_csv_at_the_validation_step(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, GMARCallback(num_probe=4), logger)
    run_dir = Path(logger.log_dir)
    with (run_dir / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    val_steps = [row["step"] for row in rows if row["val_loss"]]
    assert [row["step"] for row in rows if row.get("gmar/entropy/layer_00")] == val_steps == ["2", "5"]
    assert HeadTrajectory.load_npz(run_dir / "head_importance.npz").steps == [2, 5]
    assert sorted(path.name for path in (run_dir / "gmar").iterdir()) == ["step_000002", "step_000005"]


def test_runs_without_a_logger_never_share_a_folder(tmp_path: Path) -> None:
    for _ in range(2):
        fit(tmp_path, GMARCallback(num_probe=4), logger=False)
    runs = sorted((tmp_path / "gmar").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:
        with (run / "scalars.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert sorted({row["step"] for row in rows}) == ["2", "5"]
        assert len(rows) == len({(row["step"], row["tag"]) for row in rows})  # no duplicate step from another run


# ---------------------------------------------------------------------------------------------------------------
# item 8: one sink's folder turns read-only; the others keep writing
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only for real: permissions for normal users, a read-only bind mount for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder read-only here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


class ReadOnlyAfterFirstEvaluation(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder, self.stack = folder, contextlib.ExitStack()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == 0:
            self.stack.enter_context(read_only(self.folder))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stack.close()


class ListLogger(Logger):
    """A user's own Lightning logger: keeps metrics in a list and owns a run folder."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root, self.logged = root, []

    @property
    def name(self) -> str:
        return "mine"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.root)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_a_read_only_folder_under_the_first_sink_does_not_stop_the_others(tmp_path: Path) -> None:
    mine = ListLogger(tmp_path / "mine_root")
    run_dir = tmp_path / "mine_root" / "mine" / "version_0"  # Lightning's <save_dir>/<name>/version_<n>
    run_dir.mkdir(parents=True)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    callback = GMARCallback(num_probe=4, save_dir=str(tmp_path / "files"))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        callbacks=[callback, ReadOnlyAfterFirstEvaluation(run_dir)],
        logger=[mine, tensorboard],
        enable_checkpointing=False,  # its default folder is the first logger's
        **trainer_kwargs(tmp_path, max_epochs=3),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyViTModule(), datamodule=tiny_data())
    messages = [str(w.message) for w in caught if "GMARCallback" in str(w.message)]
    # Once for its images and once for its trajectory files, not again at each of the later retries.
    assert [message.split(" (")[0] for message in messages] == [
        "GMARCallback could not log images to LoggerSink",
        "GMARCallback could not log trajectory files to LoggerSink",
    ]
    assert all("Read-only file system" in message or "Permission denied" in message for message in messages)
    assert all("tried again at the next evaluation and at the end of the fit" in message for message in messages)
    assert HeadTrajectory.load_npz(run_dir / "head_importance.npz").steps == [2]  # written before the fault
    assert HeadTrajectory.load_npz(tmp_path / "files" / "version_0" / "head_importance.npz").steps == [2, 5, 8]
    assert HeadTrajectory.load_npz(Path(tensorboard.log_dir) / "head_importance.npz").steps == [2, 5, 8]
    # Its scalars go out at every evaluation (each retry gets that far) before its files fail.
    assert [step for step, metrics in mine.logged if "gmar/entropy/layer_00" in metrics] == [2, 5, 8]


# ---------------------------------------------------------------------------------------------------------------
# item 9: a real SIGINT / SIGTERM during a fit keeps the trajectory (and, in the demo, a checkpoint)
# ---------------------------------------------------------------------------------------------------------------


def interrupt_once_written(command: list[str], marker: Path, signum: int) -> subprocess.CompletedProcess:
    """Run ``command``, send it ``signum`` as soon as ``marker`` exists, and wait for it to end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    # As in a terminal: a test run started in the background (`cmd &` without job control) ignores SIGINT, the child
    # would inherit that and Python would then never raise KeyboardInterrupt in it.
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    try:
        while not marker.is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the fit never wrote its first evaluation"
            time.sleep(0.1)
        process.send_signal(signum)
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            try:
                stderr = process.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                stderr = "(none: its pipes stayed open after it was killed, so a child process outlived it)"
            message = f"still running 120 s after signal {signum}; its stderr ends:\n{stderr[-3000:]}"
            raise AssertionError(message) from None
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_keeps_its_history_and_last_ckpt_and_exits_non_zero(tmp_path: Path, signum: int) -> None:
    command = [
        sys.executable, "-m", "gmar_lightning.cli", "demo", "--max-train-images", "32", "--max-val-images", "16",
        "--epochs", "1000", "--batch-size", "16", "--img-size", "32", "--model-kwargs", '{"embed_dim": 32, "depth": 2}',
        "--num-probe", "4", "--no-progress-bar", "--logger", "csv", "--log-dir", str(tmp_path),
    ]  # fmt: skip
    run_dir = tmp_path / "gmar_demo" / "version_0"
    finished = interrupt_once_written(command, run_dir / "head_importance.csv", signum)
    assert finished.returncode == (1 if signum == signal.SIGINT else 128 + signal.SIGTERM), finished.stderr[-2000:]
    assert "Interrupted. Kept:" in finished.stdout
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trajectory = HeadTrajectory.load_npz(run_dir / "head_importance.npz")
    assert len(trajectory) >= 1 and csv_steps(run_dir / "head_importance.csv") == trajectory.steps
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("GMARCallback")]
    assert state["trajectory"]["steps"] == trajectory.steps[: len(state["trajectory"]["steps"])]


# ---------------------------------------------------------------------------------------------------------------
# item 10: SIGKILL at any moment never leaves a CSV and an NPZ from different evaluations
# ---------------------------------------------------------------------------------------------------------------


def keep_writing(folder: str, start: int) -> None:
    """Append one evaluation and rewrite the pair every few milliseconds, like a fit, until killed."""
    trajectory = HeadTrajectory(layer_names=[f"blocks.{layer}.attn" for layer in range(12)])
    generator = torch.Generator().manual_seed(start)
    step = start
    while True:
        step += 1
        scores = torch.rand(12, 12, generator=generator)
        trajectory.append(0, step, scores / scores.sum(dim=1, keepdim=True), scores)
        write_trajectory(trajectory, folder)
        time.sleep(0.05)


def test_sigkill_never_leaves_an_inconsistent_pair_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    shuffle = random.Random(0)
    kills_with_a_csv = 0
    for kill in range(40):
        writer = context.Process(target=keep_writing, args=(str(tmp_path), 1000 * kill), daemon=True)
        writer.start()
        time.sleep(0.05 + shuffle.random() * 0.3)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        npz, csv_path = tmp_path / "head_importance.npz", tmp_path / "head_importance.csv"
        if not npz.exists():
            continue  # killed before the first write finished
        steps = HeadTrajectory.load_npz(npz).steps  # never truncated
        if csv_path.exists():
            kills_with_a_csv += 1
            assert csv_steps(csv_path) == steps, f"kill {kill}: the CSV and the NPZ hold different evaluations"
    assert kills_with_a_csv >= 8  # the kills landed between writes too, not only inside them
    write_trajectory(HeadTrajectory(), tmp_path)  # the next write cleans what killed writers left
    assert sorted(path.name for path in tmp_path.iterdir()) == ["head_importance.csv", "head_importance.npz"]
    assert np.load(tmp_path / "head_importance.npz")["steps"].tolist() == []


class SwallowedCtrlC(pl.Callback):
    """At the second training batch, Ctrl-C arrives while a weakref callback runs: Python prints "Exception ignored
    in ..." and drops the KeyboardInterrupt, as happened to a demo in CI."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 2:

            class Referent:
                pass

            referent = Referent()
            reference = weakref.ref(referent, lambda _: signal.raise_signal(signal.SIGINT))  # noqa: F841
            del referent  # the callback runs here and its KeyboardInterrupt is swallowed


def test_a_ctrl_c_that_python_swallowed_still_stops_the_demos_fit(tmp_path: Path) -> None:
    from gmar_lightning.demos.job import _KeyboardInterruptAgain, _noting_interrupts

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore SIGINT
    interrupted = threading.Event()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=50, logger=False, enable_checkpointing=False),
        callbacks=[SwallowedCtrlC(), _KeyboardInterruptAgain(interrupted)],
    )
    try:
        with pytest.raises(SystemExit), _noting_interrupts(interrupted):  # Lightning's exit on KeyboardInterrupt
            trainer.fit(TinyViTModule(), datamodule=tiny_data())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.is_set() and trainer.global_step == 2
    assert signal.getsignal(signal.SIGINT) is previous
