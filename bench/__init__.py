"""Benchmarks: python -m bench.run (speed), python -m bench.gpu_check (graphs vs eager on a GPU)."""
