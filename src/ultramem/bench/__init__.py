"""Benchmarks (optimiser value path, training throughput); each module runs as a script."""
