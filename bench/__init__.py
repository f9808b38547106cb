"""Benchmarks of moe-train: `python -m bench --quick` (see bench/__main__.py and bench/RESULTS.md)."""
