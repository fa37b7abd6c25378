"""Run independent training jobs in parallel processes, one torch thread each.

Toy-sized SAEs gain little from intra-op threads, while several multi-threaded torch processes
on few cores slow each other down by an order of magnitude; one thread per process and one
process per core uses the machine fully. Results are handed back as each job finishes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, on_result: Callable[[Any], None]) -> None:
    """Call `on_result(fn(job))` for every job; `fn` must be importable (it runs in spawned processes).

    If the parent stops (an exception, Ctrl-C or SIGTERM), the pool is terminated, so no worker
    goes on training after the command that started it has gone."""
    jobs = list(jobs)
    if workers <= 1:
        for job in jobs:
            on_result(fn(job))
        return
    ctx = multiprocessing.get_context("spawn")
    with _sigterm_raises(), ctx.Pool(workers) as pool:  # leaving the block terminates the workers
        for result in pool.imap_unordered(fn, jobs):
            on_result(result)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises SystemExit while the pool runs (its default action would kill the parent at
    once, skipping the pool's cleanup and orphaning the workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_workers(n_jobs: int) -> int:
    return max(1, min(n_jobs, os.cpu_count() or 1))
