"""Benchmarks and design experiments; each script writes its results under benchmarks/results/."""
