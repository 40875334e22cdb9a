"""Benchmarks: python -m bench.run (speed against transformers), python -m bench.gpu_suite
(everything only a GPU shows, with a CPU mode for CI)."""
