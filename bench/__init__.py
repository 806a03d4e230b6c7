"""Benchmarks of the propensity gRPC service: `python -m bench.run` (or `make bench`).

Pure helpers (frame encoding, h2load log parsing, percentiles, results and targets) live in
small modules so that tests/test_bench_tools.py can check them without a server.
"""

__all__ = ["frames", "h2load", "results"]
