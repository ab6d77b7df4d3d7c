"""Headless Chromium and a local TensorBoard server, shared by the browser tests and docs/scripts/make_figures.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_TIMEOUT_S = 120
SERVER_TIMEOUT_S = 90.0
# TensorBoard's default card size is what a user sees first; a 1400 x 1000 window is a common laptop browser.
WINDOW = (1400, 1000)


def find_browser() -> str | None:
    """The first Chromium-like browser on the PATH, or ``None``."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _flags(profile: Path, window: tuple[int, int]) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
        f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=20000",
        # Draws every frame, so IntersectionObserver callbacks (Time Series renders cards in view) run in time.
        "--run-all-compositor-stages-before-draw",
    ]  # fmt: skip


def screenshot(browser: str, url: str, path: Path, profile: Path, window: tuple[int, int] = WINDOW) -> Path:
    """A PNG screenshot of ``url`` after its scripts ran, at ``window`` size."""
    subprocess.run(
        [browser, *_flags(profile, window), f"--screenshot={path}", url],
        check=True,
        capture_output=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    return path


def rendered_dom(browser: str, url: str, profile: Path, window: tuple[int, int] = WINDOW) -> str:
    """The DOM of ``url`` after its scripts ran, as headless Chromium serialises it (no shadow roots)."""
    completed = subprocess.run(
        [browser, *_flags(profile, window), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Chromium failed on {url}: {completed.stderr[-2000:]}")
    return completed.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@contextmanager
def tensorboard(log_dir: Path, *options: str) -> Iterator[str]:
    """``tensorboard --logdir log_dir`` on a free local port; yields its base URL once it serves ``gmar/`` tags."""
    port = _free_port()
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1",
        "--port", str(port), "--load_fast", "false", "--reload_interval", "1", *options,
    ]  # fmt: skip
    # Output goes to a file, not a pipe: an unread pipe could fill up and stall the server.
    with (log_dir / "tensorboard_server.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            try:
                if b"gmar/" in get(f"{base_url}/data/plugin/images/tags"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard did not serve the gmar tags at {base_url} within {SERVER_TIMEOUT_S} s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
