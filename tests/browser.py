"""Headless Chromium and a local TensorBoard server, shared by the browser tests and docs/scripts/make_figures.py."""

from __future__ import annotations

import fcntl
import json
import os
import select
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
# Headless Chromium took over 120 s for one TensorBoard screenshot on a loaded 2-core machine.
BROWSER_TIMEOUT_S = 300
SERVER_TIMEOUT_S = 90.0
# TensorBoard's default card size is what a user sees first; a 1400 x 1000 window is a common laptop browser.
WINDOW = (1400, 1000)


def _stop(process: subprocess.Popen) -> None:
    """End a browser or server process: terminate, then kill if it has not exited within 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


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


def evaluate(
    browser: str, url: str, expression: str, profile: Path, window: tuple[int, int] = WINDOW, settle_s: float = 8.0
) -> object:
    """The JSON value of a JavaScript ``expression`` in ``url`` after ``settle_s`` seconds, in headless Chromium.

    Speaks the DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on file descriptors 3 and 4),
    so it needs nothing but the browser: layout sizes (``getBoundingClientRect``) that a DOM dump cannot give.
    """
    to_browser_read, to_browser_write = os.pipe()
    from_browser_read, from_browser_write = os.pipe()
    flags = [flag for flag in _flags(profile, window) if not flag.startswith("--virtual-time-budget")]

    def pipe_to_fds_3_and_4() -> None:
        # Chromium reads commands from its fd 3 and writes replies to its fd 4. Copy the pipe ends above 4 first, so
        # neither dup2 overwrites the other's source; dup2 makes 3 and 4 inheritable, the pipes' own fds are not.
        read_end = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
        write_end = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)

    # close_fds=False: pass_fds would need fds 3 and 4 open in this process; every other fd is close-on-exec.
    process = subprocess.Popen(
        [browser, *flags, "--remote-debugging-pipe", "about:blank"],
        close_fds=False,
        preexec_fn=pipe_to_fds_3_and_4,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_browser_read)
    os.close(from_browser_write)
    writer = os.fdopen(to_browser_write, "wb")
    pending = b""
    counter = iter(range(1, 1 << 30))

    def call(method: str, session: str | None = None, **params: object) -> dict:
        nonlocal pending
        identifier = next(counter)
        message: dict[str, object] = {"id": identifier, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        writer.write(json.dumps(message).encode() + b"\0")
        writer.flush()
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while time.monotonic() < deadline:
            while b"\0" in pending:
                raw, pending = pending.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == identifier:
                    if "error" in reply:
                        raise RuntimeError(f"{method} failed: {reply['error']}")
                    return reply["result"]
            # Wait for the reply no longer than the deadline: a Chromium that hangs silent must not hang the test.
            readable, _, _ = select.select([from_browser_read], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(from_browser_read, 1 << 16) if readable else b""
            if not chunk:
                break
            pending += chunk
        raise RuntimeError(f"Chromium gave no reply to {method}")

    try:
        target = call("Target.createTarget", url=url)["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        call("Emulation.setDeviceMetricsOverride", session, width=window[0], height=window[1],
             deviceScaleFactor=1, mobile=False)  # fmt: skip
        time.sleep(settle_s)  # TensorBoard fetches and lays out its cards after load
        result = call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")
    finally:
        writer.close()
        os.close(from_browser_read)
        _stop(process)


# Each Time Series image card: its tag, the logged image's size and the box TensorBoard draws it in (the <img> element;
# `object-fit: contain` scales the picture to fit it).
_IMAGE_CARDS_SCRIPT = """Array.from(document.querySelectorAll('image-card-component')).map(card => {
  const image = card.querySelector('img');
  const box = image ? image.getBoundingClientRect() : null;
  return {tag: (card.querySelector('.tag-path') || card).textContent.trim(),
          logged: image ? [image.naturalWidth, image.naturalHeight] : null, box: box ? [box.width, box.height] : null};
})"""


def image_cards(browser: str, url: str, profile: Path, window: tuple[int, int] = WINDOW) -> list[dict[str, object]]:
    """Every image card of a Time Series page: ``tag``, ``logged`` and ``box`` sizes and the on-screen ``scale``.

    The scale is what ``object-fit: contain`` gives, ``min(box / logged)`` per side; text ``s`` pixels tall in the
    logged image is ``s * scale`` pixels tall on screen.
    """
    cards = evaluate(browser, url, _IMAGE_CARDS_SCRIPT, profile, window)
    assert isinstance(cards, list)
    for card in cards:
        logged, box = card["logged"], card["box"]
        drawn = logged and box and logged[0] > 0
        card["scale"] = min(box[0] / logged[0], box[1] / logged[1]) if drawn else None
    return cards


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
        _stop(process)
