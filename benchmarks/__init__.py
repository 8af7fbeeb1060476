"""Benchmarks of mpisplit against a hand-written NumPy floor and PyTorch (see README.md)."""
