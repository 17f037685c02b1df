"""Benchmarks behind `astra bench`: kernel microbenchmarks (and, later, end-to-end runs)."""
