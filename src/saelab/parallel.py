"""Run independent training jobs in parallel processes, one torch thread each.

Toy-sized SAEs gain little from intra-op threads, while several multi-threaded torch processes
on few cores slow each other down by an order of magnitude; one thread per process and one
process per core uses the machine fully. Results are handed back as each job finishes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterable
from typing import Any


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, on_result: Callable[[Any], None]) -> None:
    """Call `on_result(fn(job))` for every job; `fn` must be importable (it runs in spawned processes)."""
    jobs = list(jobs)
    if workers <= 1:
        for job in jobs:
            on_result(fn(job))
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for future in concurrent.futures.as_completed([pool.submit(fn, job) for job in jobs]):
            on_result(future.result())


def default_workers(n_jobs: int) -> int:
    return max(1, min(n_jobs, os.cpu_count() or 1))
