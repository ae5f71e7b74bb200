"""Benchmark suites behind ``kdfast bench``: one module per op family, each a ``run(...)``."""
