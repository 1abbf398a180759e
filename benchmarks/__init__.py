"""Benchmarks and design experiments. `python -m benchmarks` runs the suite (benchmarks/suite.py); the
older scripts (faust_vs_poll, capacity, bench_generate) still run on their own and write under results/."""
