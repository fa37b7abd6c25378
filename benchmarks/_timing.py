"""Timing helpers shared by the benchmark scripts (imported as a sibling module when run as scripts)."""

from __future__ import annotations

import time


def race(fns: dict, repeats: int) -> dict:
    """Best time of each function, run round-robin so load from other processes hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}
