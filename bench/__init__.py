"""Benchmarks against named baselines: each run writes bench/results/<name>.json and regenerates bench/RESULTS.md."""
