"""Measurements behind BENCHMARKS.md; each runs from the repository root as
``python -m benchmarks.bench_x`` (device steps: ``bash benchmarks/device_run.sh STEP``)."""
