"""The GPU suite: `python -m bench.gpu_suite` (see __main__.py, parts.py, BENCHMARKS.md)."""
