"""Context windows: how a long clip is cut into overlapping windows the temporal modules can see.

The release uses closed-loop windows (they wrap from the clip's end back to its start) with a
random per-step offset; noise predictions of overlapping windows are averaged per frame. Open
windows (no wrap, last window aligned to the clip's end) are offered for clips whose end and start
should not share a temporal window.
"""
from __future__ import annotations

import torch


def context_windows(num_frames: int, size: int, overlap: int, offset: int = 0, closed_loop: bool = True) -> list[list[int]]:
    """Frame indices of each window.

    Closed loop (release): window k covers (k*(size-overlap) + e + offset) mod F for e < size,
    for every start k*(size-overlap) < F. A clip no longer than `size` is one window, offset ignored.
    Open: starts 0, stride, 2*stride, ... with the last window ending at the last frame.
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need context size >= 1 and 0 <= overlap < size; got size={size}, overlap={overlap}")
    if num_frames <= size:
        return [list(range(num_frames))]
    stride = size - overlap
    if closed_loop:
        return [[(start + e + offset) % num_frames for e in range(size)] for start in range(0, num_frames, stride)]
    starts = list(range(0, num_frames - size + 1, stride))
    if starts[-1] + size < num_frames:
        starts.append(num_frames - size)
    return [list(range(s, s + size)) for s in starts]


def window_weights(windows: list[list[int]], num_frames: int) -> torch.Tensor:
    """How many windows cover each frame (the divisor of the per-frame average). Errors if one is uncovered."""
    counts = torch.zeros(num_frames)
    for window in windows:
        counts[torch.tensor(window)] += 1
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise RuntimeError(f"context windows leave frames {missing[:10]} uncovered")
    return counts
