"""Side-by-side benchmarks of torbridge; run each from the repository root as
``python -m bench.bench_NAME`` (see bench/README.md)."""
