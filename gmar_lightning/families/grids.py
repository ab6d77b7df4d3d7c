"""Token geometry shared by the families: windows with a cyclic shift, 2x2 merging, pooling cells.

Tokens of an ``h x w`` grid are numbered row-major, ``i * w + j``. Every function returns index tensors for
`gmar_lightning.mixing`; ``-1`` marks a padding slot that holds no token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gmar_lightning.mixing import AttentionMixing, TokenMap

__all__ = [
    "adaptive_cells",
    "conv_map",
    "conv_output",
    "coverage_map",
    "global_mixing",
    "grid_cells",
    "merge_map",
    "pair",
    "pool_cells",
    "window_mixing",
    "window_tokens",
]


def global_mixing(num_tokens: int) -> AttentionMixing:
    """Every token attends to every token (plain self-attention)."""
    return AttentionMixing(num_tokens)


def window_tokens(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0), offset: int = 0
) -> torch.Tensor:
    """``[W, wh * ww]`` the token in each slot of each window, row-major over windows and within them.

    The grid is first rolled by ``-shift`` (Swin's cyclic shift: slot ``(i, j)`` holds token
    ``((i + shift_h) mod h, (j + shift_w) mod w)``), then padded at the bottom and right to whole windows
    (padding slots are ``-1``). ``offset`` is added to every real token index (prefix tokens before the grid).

    Examples:
        >>> window_tokens((2, 3), (2, 2)).tolist()
        [[0, 1, 3, 4], [2, -1, 5, -1]]
        >>> window_tokens((2, 2), (1, 2), shift=(1, 0)).tolist()
        [[2, 3], [0, 1]]
    """
    height, width = grid
    rows = (torch.arange(height) + shift[0]) % height
    cols = (torch.arange(width) + shift[1]) % width
    tokens = rows[:, None] * width + cols[None, :] + offset
    padded_h, padded_w = math.ceil(height / window[0]) * window[0], math.ceil(width / window[1]) * window[1]
    padded = torch.full((padded_h, padded_w), -1, dtype=torch.long)
    padded[:height, :width] = tokens
    blocks = padded.view(padded_h // window[0], window[0], padded_w // window[1], window[1]).permute(0, 2, 1, 3)
    return blocks.reshape(-1, window[0] * window[1])


def window_mixing(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0), num_prefix_tokens: int = 0
) -> AttentionMixing:
    """Self-attention inside (shifted) windows of a grid: queries and keys are the same window slots."""
    tokens = window_tokens(grid, window, shift, offset=num_prefix_tokens)
    return AttentionMixing(num_prefix_tokens + grid[0] * grid[1], queries=tokens, keys=tokens)


def merge_map(grid: tuple[int, int], factor: int = 2) -> TokenMap:
    """Patch merging: merged token ``(i, j)`` is made from its ``factor x factor`` children (padding children
    dropped); relevance flows back as in `coverage_map`.

    Examples:
        >>> merge = merge_map((2, 3))
        >>> merge.sources.tolist(), (merge.weights * 3).round().tolist()  # 2 new tokens from 6: weights 1/3
        ([[0, 1, 3, 4], [2, 5, -1, -1]], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    """
    height, width = grid
    cells = [
        [
            (i * width + j)
            for i in range(r * factor, min((r + 1) * factor, height))
            for j in range(c * factor, min((c + 1) * factor, width))
        ]
        for r in range(math.ceil(height / factor))
        for c in range(math.ceil(width / factor))
    ]
    return coverage_map(cells, height * width)


def pool_cells(size: int, out_size: int, kernel: int, stride: int, padding: int) -> list[list[int]]:
    """The input positions each output position of a 1-d pooling or convolution window reads (padding excluded)."""
    return [
        [p for p in range(o * stride - padding, o * stride - padding + kernel) if 0 <= p < size]
        for o in range(out_size)
    ]


def adaptive_cells(size: int, out_size: int) -> list[list[int]]:
    """The input positions of each output of ``adaptive_avg_pool`` (PyTorch's floor/ceil cell bounds)."""
    return [list(range(math.floor(o * size / out_size), math.ceil((o + 1) * size / out_size))) for o in range(out_size)]


def grid_cells(rows: list[list[int]], cols: list[list[int]], width: int, offset: int = 0) -> list[list[int]]:
    """2-d cells from 1-d row and column cells, as token indices of a row-major grid of ``width`` columns."""
    return [[offset + i * width + j for i in row for j in col] for row in rows for col in cols]


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output(grid: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    """The output grid of a convolution (or any module with ``kernel_size``, ``stride`` and ``padding``)."""
    kernel, stride, padding = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
    return tuple((size + 2 * pad - k) // s + 1 for size, k, s, pad in zip(grid, kernel, stride, padding, strict=True))


def conv_map(grid: tuple[int, int], conv: nn.Conv2d, num_prefix_tokens: int = 0) -> tuple[TokenMap, tuple[int, int]]:
    """A patch embedding or pooling convolution: each output token is made from the input tokens under its kernel;
    relevance flows back as in `coverage_map`, so overlapping kernels make no checkerboard.

    Prefix tokens (before the grid, in both spaces) map to themselves. Returns the map and the output grid.

    Examples:
        >>> token_map, out = conv_map((3, 3), nn.Conv2d(1, 1, kernel_size=3, stride=2, padding=1), num_prefix_tokens=1)
        >>> out, token_map.sources[1].tolist()
        ((2, 2), [1, 2, 4, 5])
    """
    kernel, stride, padding = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
    out = conv_output(grid, conv)
    rows = pool_cells(grid[0], out[0], kernel[0], stride[0], padding[0])
    cols = pool_cells(grid[1], out[1], kernel[1], stride[1], padding[1])
    cells = grid_cells(rows, cols, grid[1], offset=num_prefix_tokens)
    return coverage_map(cells, num_prefix_tokens + grid[0] * grid[1], num_prefix_tokens), out


def coverage_map(cells: list[list[int]], num_inputs: int, num_prefix_tokens: int = 0) -> TokenMap:
    """A map between grids whose new token ``i`` is made from the old grid tokens ``cells[i]`` (a kernel's cell).

    Relevance flows back so that a token covered by several cells counts once: old token ``j`` receives the mean of
    the relevance of the ``c_j`` new tokens whose cells contain it, times ``n_new / n_covered`` (the new grid's tokens
    over the old grid tokens in any cell), so that relevance spread evenly over the new grid stays even and keeps its
    total. The weights are ``T[i, j] = (n_new / n_covered) / c_j``; for cells that tile the grid (patch merging of an
    even grid, a kernel equal to its stride) this is ``1 / |cell_i|``, the plain average. Tokens in no cell receive
    nothing. The ``num_prefix_tokens`` tokens before the grid (in both spaces) map to themselves.

    Examples:
        >>> overlapping = coverage_map([[0, 1, 2], [2, 3, 4]], num_inputs=5)  # token 2 is under both kernels
        >>> (overlapping.pull_back(torch.tensor([[1.0, 1.0]])) * 5).round().tolist()  # 2 / 5 each, in total 2
        [[2.0, 2.0, 2.0, 2.0, 2.0]]
    """
    counts = torch.zeros(num_inputs)
    for cell in cells:
        counts[cell] += 1
    ratio = len(cells) / max(int((counts > 0).sum()), 1)
    longest = max(len(cell) for cell in cells)
    prefix = list(range(num_prefix_tokens))
    sources = torch.full((num_prefix_tokens + len(cells), longest), -1, dtype=torch.long)
    weights = torch.zeros(num_prefix_tokens + len(cells), longest)
    sources[prefix, 0], weights[prefix, 0] = torch.tensor(prefix, dtype=torch.long), 1.0
    for index, cell in enumerate(cells, start=num_prefix_tokens):
        sources[index, : len(cell)] = torch.tensor(cell, dtype=torch.long)
        weights[index, : len(cell)] = ratio / counts[cell]
    return TokenMap(sources, weights, num_inputs)
