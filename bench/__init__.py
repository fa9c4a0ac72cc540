"""Benchmarks: `switchboard bench density|throughput|compare` and the core
microbenchmarks (pytest-benchmark, test_*_bench.py)."""
