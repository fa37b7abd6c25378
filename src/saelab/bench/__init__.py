"""Benchmarks of SAE architectures against ground truth (`saelab bench toy`)."""

from saelab.bench.toy import WORLDS, BenchConfig, BenchResult, run_toy_bench

__all__ = ["WORLDS", "BenchConfig", "BenchResult", "run_toy_bench"]
