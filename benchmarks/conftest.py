"""pytest-benchmark entry: ``pytest benchmarks/ --benchmark-only`` (needs the [bench] extra)."""
