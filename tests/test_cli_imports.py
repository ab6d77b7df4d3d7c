"""`gmar-lightning` imports Lightning only to run the demo: `--help`, `explain` and `report` start without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmar_lightning.trajectory import HeadTrajectory
from tests.test_cli import TINY_OPTIONS, tiny_vit

# What the command runs in a fresh interpreter, given the argv of one explain, one report and one demo: the parser's
# help pages, then each command; it prints the exit statuses and the Lightning modules loaded before the demo and after.
_SCRIPT = """
import json, sys
from gmar_lightning.cli import build_parser, main

def lightning_modules():
    return sorted(name for name in sys.modules if name.split(".")[0] in ("lightning", "pytorch_lightning"))

for argv in (["--help"], ["explain", "--help"], ["report", "--help"], ["demo", "--help"]):
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pass
explain_argv, report_argv, demo_argv = json.loads(sys.argv[1])
statuses = [main(explain_argv), main(report_argv)]
before_demo = lightning_modules()
statuses.append(main(demo_argv))
print(json.dumps({"statuses": statuses, "before_demo": before_demo, "after_demo": lightning_modules()}))
"""


@pytest.mark.integration
def test_help_explain_and_report_do_not_import_lightning_but_the_demo_does(tmp_path: Path) -> None:
    weights = tmp_path / "tiny_vit.pth"
    torch.save(tiny_vit(seed=7).state_dict(), weights)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    run_dir = tmp_path / "run"
    trajectory = HeadTrajectory(layer_names=["blocks.0.attn", "blocks.1.attn"])
    for epoch in range(2):
        weights_of_heads = torch.rand(2, 4, generator=torch.Generator().manual_seed(epoch)).softmax(dim=-1)
        trajectory.append(epoch, 10 * (epoch + 1), weights_of_heads, weights_of_heads * 3)
    trajectory.save_npz(run_dir / "head_importance.npz")
    explain_argv = ["explain", str(image), *TINY_OPTIONS, "--checkpoint", str(weights), "--device", "cpu"]
    explain_argv += ["--output", str(tmp_path / "maps")]
    # A demo that fails at once (no train/ folder), after its handler has imported the training job.
    demo_argv = ["demo", "--data-dir", str(tmp_path / "no_data"), "--log-dir", str(tmp_path / "logs")]

    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([explain_argv, ["report", str(run_dir)], demo_argv])],
        capture_output=True,
        text=True,
        # A hang guard only, as long as the other CLI subprocess tests'.
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.splitlines()[-1])
    assert result["statuses"] == [0, 0, 2], completed.stderr
    assert (tmp_path / "maps" / "maps.npz").is_file()
    assert (run_dir / "report" / "report.html").is_file()
    assert result["before_demo"] == []
    # The check can see Lightning when it is loaded: running the demo brings it in.
    assert "lightning.pytorch" in result["after_demo"]
