"""Every Python block in README.md and docs/, and every shell block in README.md, docs/quickstart.md and
docs/guide/, runs as written, unless it is marked as not run with a reason.

A block is skipped only when the line before its fence is ``<!-- docs-test: skip (reason) -->``. The Python blocks of
one page run in order in one namespace, in a temporary working directory, so a page may build on its earlier blocks;
its shell blocks run in order with ``bash -euo pipefail`` in one temporary working directory of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PAGES = sorted([REPOSITORY / "README.md", *(REPOSITORY / "docs").rglob("*.md")])
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->")
SHELL_PAGES = sorted(
    [REPOSITORY / "README.md", REPOSITORY / "docs" / "quickstart.md", *(REPOSITORY / "docs" / "guide").rglob("*.md")]
)


def python_blocks(page: Path, fence: re.Pattern[str] = FENCE) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of each Python block (or each block ``fence`` matches) of a page."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in fence.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), skip.group("reason") if skip else None))
    return blocks


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def test_the_collector_finds_the_blocks() -> None:
    readme = python_blocks(REPOSITORY / "README.md")
    assert len(readme) >= 2 and all(code.strip() for _, code, _ in readme)
    assert len(PAGES_WITH_CODE) >= 4


@pytest.mark.integration
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a block that needs downloads must be marked, not fetch them
    matplotlib.use("Agg")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for line, code, reason in python_blocks(page):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"{page.relative_to(REPOSITORY)}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"the block at {page.name}:{line} fails: {type(error).__name__}: {error}")
        ran += 1
    assert ran or all(reason for _, _, reason in python_blocks(page))


def shell_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of each shell block (bash, sh, shell, console) of a page."""
    return python_blocks(page, SHELL_FENCE)


SHELL_PAGES_WITH_CODE = [page for page in SHELL_PAGES if shell_blocks(page)]


def test_the_collector_finds_the_shell_blocks() -> None:
    assert len(shell_blocks(REPOSITORY / "README.md")) >= 2
    assert any(reason is None for page in SHELL_PAGES for _, _, reason in shell_blocks(page))


@pytest.mark.integration
@pytest.mark.parametrize("page", SHELL_PAGES_WITH_CODE, ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_shell_blocks_run(page: Path, tmp_path: Path) -> None:
    # The interpreter running the tests (and the `gmar-lightning` script beside it) run the blocks; the examples and
    # benchmarks folders are where the pages say they are.
    for folder in ("examples", "benchmarks"):
        (tmp_path / folder).symlink_to(REPOSITORY / folder)
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    ran = 0
    for line, code, reason in shell_blocks(page):
        if reason is not None:
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"the shell block at {page.name}:{line} fails ({result.returncode}): {result.stderr[-2000:]}")
        ran += 1
    assert ran or all(reason for _, _, reason in shell_blocks(page))


def test_docstrings_use_mkdocstrings_cross_references() -> None:
    """The API pages render Markdown: a Sphinx role such as :func:`x` would show up as literal text."""
    role = re.compile(r":(?:func|class|meth|data|attr|mod|exc|obj):`")
    offenders = [
        f"{path.relative_to(REPOSITORY)}:{number}"
        for path in sorted((REPOSITORY / "gmar_lightning").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if role.search(line)
    ]
    assert not offenders, f"write [`name`][gmar_lightning.module.name] instead of Sphinx roles in {offenders}"
