"""The machine under everything: NumPy or CuPy arrays (backend.py), BLAS threads, the allocator,
GPU binding (device.py), durable files, errors that every rank raises alike (errors.py) and
failure handling (faults/). Imports nothing else of mpisplit.
"""
