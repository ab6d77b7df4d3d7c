"""Time assembling everything one evaluation logs: the record of a 16-image probe explained by two methods.

That is the captioned overlay grid and the per-image overlays of each method, the evolution figure of each method over
16 evaluations, the heatmap, trajectory and specialisation figures, histograms, scalars and the head-weight table, as
[`evaluation_record`][gmar_lightning.callback.records.evaluation_record] builds them (a sink then only encodes them).

A speed target, not a test (a timed assert fails on a busy machine): prints the CPU time of one evaluation's record,
measured after a warm-up (font cache, colormaps), as the median of ``--repeats`` runs.

    python benchmarks/bench_render.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gmar_lightning.callback.records import MapHistory, Probe, evaluation_record
from gmar_lightning.explanation import Explanation
from gmar_lightning.trajectory import HeadTrajectory

LAYERS, HEADS, PROBE, SIDE, EVALUATIONS = 4, 4, 16, 64, 16
LAYER_NAMES = [f"blocks.{layer}.attn" for layer in range(LAYERS)]


def make_explanation(method: str, generator: torch.Generator) -> Explanation:
    weights = torch.rand(PROBE, LAYERS, HEADS, generator=generator).softmax(dim=-1) if method == "gmar_l1" else None
    return Explanation(
        method,
        torch.rand(PROBE, SIDE // 8, SIDE // 8, generator=generator),
        torch.rand(PROBE, SIDE, SIDE, generator=generator),
        torch.zeros(PROBE, dtype=torch.long),
        torch.randn(PROBE, 4, generator=generator),
        weights,
        None if weights is None else 3 * weights,
        LAYER_NAMES,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    probe = Probe(torch.randn(PROBE, 3, SIDE, SIDE, generator=generator), torch.arange(PROBE) % 4)
    explanations = {method: make_explanation(method, generator) for method in ("gmar_l1", "rollout")}
    trajectory, history = HeadTrajectory(layer_names=LAYER_NAMES), MapHistory()
    for epoch in range(EVALUATIONS):
        weights = torch.rand(LAYERS, HEADS, generator=generator).softmax(dim=-1)
        trajectory.append(epoch, 100 * epoch, weights, 3 * weights)
        history.append(epoch, {method: explanation.maps for method, explanation in explanations.items()})
    options = {
        "step": 100 * EVALUATIONS, "epoch": EVALUATIONS - 1, "probe": probe, "explanations": explanations,
        "trajectory": trajectory, "head_method": "gmar_l1", "map_history": history,
        "class_names": ["circle", "square", "triangle", "cross"],
    }  # fmt: skip
    evaluation_record(**options)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.process_time()  # CPU time, so other processes on a busy machine do not count
        evaluation_record(**options)
        times.append(time.process_time() - start)
    print(f"one evaluation's record: median {statistics.median(times):.3f} s CPU over {args.repeats} runs")


if __name__ == "__main__":
    main()
