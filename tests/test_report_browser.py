"""The HTML report renders in a real browser: headless Chromium decodes every embedded plot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gmar_lightning.callback.records import EvaluationRecord
from gmar_lightning.callback.sinks import FileSink
from gmar_lightning.report import build_report
from gmar_lightning.trajectory import HeadTrajectory
from tests.browser import find_browser, rendered_dom

# A headless browser renders the report.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("processes")]


def _browser() -> str:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium binary found; apt-get install chromium")
    return browser


def _rendered_dom(browser: str, page: Path, profile: Path) -> str:
    return rendered_dom(browser, page.resolve().as_uri(), profile)


def _image_counts(dom: str) -> tuple[int, int]:
    """``(loaded, total)`` from the data attributes the report's inline script sets on ``<body>``."""
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, f"the report's load script did not run; <body> is {dom[dom.find('<body') :][:200]!r}"
    return int(loaded.group(1)), int(total.group(1))


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"])
    generator = torch.Generator().manual_seed(0)
    for epoch in range(4):
        weights = (3 * torch.rand(3, 4, generator=generator)).softmax(dim=-1)
        trajectory.append(epoch, 25 * (epoch + 1), weights, 2 * weights)
    trajectory.save_npz(run_dir / "head_importance.npz")
    FileSink(run_dir / "gmar").log_evaluation(
        EvaluationRecord(100, 3, images={"gmar/overlay/gmar_l1": torch.rand(3, 24, 24, generator=generator)})
    )
    report = build_report(run_dir)
    assert len(report.plots) == 3 and len(report.overlays) == 1
    return report.html_path


def test_every_plot_renders_in_chromium(report_page: Path, tmp_path: Path) -> None:
    browser = _browser()
    dom = _rendered_dom(browser, report_page, tmp_path / "profile")
    assert _image_counts(dom) == (5, 5)  # 3 plots, the first and the latest overlay
    assert "GMAR report" in dom and "blocks.2.attn" in dom


def test_a_broken_image_is_detected(report_page: Path, tmp_path: Path) -> None:
    """The load marker really checks decoding: a page with one corrupted image reports one image fewer."""
    browser = _browser()
    page = report_page.read_text(encoding="utf-8")
    corrupted = page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    broken_page = tmp_path / "broken.html"
    broken_page.write_text(corrupted, encoding="utf-8")
    assert _image_counts(_rendered_dom(browser, broken_page, tmp_path / "profile")) == (4, 5)
