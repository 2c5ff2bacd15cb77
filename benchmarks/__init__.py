"""Benchmarks of natten_jax against peers (cuDNN dense, XLA masked dense, torch FlexAttention).

Run ``python -m benchmarks.bench_na --help``; every script shares the harness of
:mod:`benchmarks.harness`. Kept free of imports so that a script can set JAX's environment
variables before JAX loads.
"""
