"""Benchmarks of natten_jax against peers (cuDNN dense, XLA masked dense, torch FlexAttention).

Run ``python -m benchmarks.bench_na --help``. Kept free of imports so that ``bench_na`` can set
JAX's environment variables before JAX loads.
"""
