"""The benchmark suite: `pytest benchmarks/` (docs/benchmarks.md)."""
