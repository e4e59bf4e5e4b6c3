"""Benchmarks: one script per performance target, run as ``python -m benchmarks.<name>`` from the repo root."""
