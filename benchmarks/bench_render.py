"""Time rendering everything one evaluation logs: an overlay grid of 16 probe images and three figures to PNG.

A speed target, not a test (a timed assert fails on a busy machine): prints the CPU time of one evaluation's
rendering, measured after a warm-up (font cache, colormaps), as the median of ``--repeats`` runs.

    python benchmarks/bench_render.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gmar_lightning.render import (
    denormalize,
    figure_to_png_bytes,
    head_heatmap_figure,
    overlay_grid_image,
    specialisation_figure,
    trajectory_figure,
)
from gmar_lightning.trajectory import HeadTrajectory


def make_trajectory(epochs: int = 10, layers: int = 4, heads: int = 4) -> HeadTrajectory:
    generator = torch.Generator().manual_seed(0)
    trajectory = HeadTrajectory(layer_names=[f"blocks.{i}.attn" for i in range(layers)])
    for epoch in range(epochs):
        weights = torch.rand(layers, heads, generator=generator).softmax(dim=1)
        trajectory.append(epoch, 10 * epoch, weights, weights * 3)
    return trajectory


def render_evaluation(images: torch.Tensor, maps: torch.Tensor, trajectory: HeadTrajectory) -> None:
    overlay_grid_image(denormalize(images), maps)
    for figure in (
        head_heatmap_figure(trajectory.weights[-1], trajectory.layer_names),
        trajectory_figure(trajectory),
        specialisation_figure(trajectory),
    ):
        figure_to_png_bytes(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images, maps, trajectory = torch.randn(16, 3, 48, 48), torch.rand(16, 48, 48), make_trajectory()
    render_evaluation(images, maps, trajectory)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.process_time()  # CPU time, so other processes on a busy machine do not count
        render_evaluation(images, maps, trajectory)
        times.append(time.process_time() - start)
    print(f"rendering one evaluation: median {statistics.median(times):.3f} s CPU over {args.repeats} runs")


if __name__ == "__main__":
    main()
