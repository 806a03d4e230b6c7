"""Benchmarks of the propensity gRPC service: `python -m bench.run` (or `make bench`).

Pure helpers (frame encoding, h2load output and log parsing, the round window, user rotation,
server CPU from /proc, /metrics parsing, the open-loop summary, results and targets) live in
small modules so that tests/test_bench_tools.py can check them without a server.
"""

__all__ = ["cpu", "frames", "h2load", "open_loop", "prom", "results", "rotation"]
