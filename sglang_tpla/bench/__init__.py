"""Benchmarks (timed side by side in one run)."""
