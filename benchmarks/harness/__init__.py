"""The benchmark harness every script of benchmarks/ shares.

* :mod:`problems`: the problem set (problems.json, its variants, GQA variants, --quick sizes).
* :mod:`flops`: the work model (useful and visited FLOPs, bytes, the floor, models' GMACs).
* :mod:`calls`: the functions timed (natten_jax calls with a fused config, forward+backward).
* :mod:`timing`: timing of JAX and torch callables; of ahead-of-time compiled calls.
* :mod:`aot`: the ahead-of-time compiled call (:class:`aot.Compiled`).
* :mod:`gpu_lock`: the file lock that lets processes compile side by side and time in turn.
* :mod:`results`: the environment and device name, JSON files, and the records
  ``benchmarks/results/<gpu>.json`` that the docs' tables are generated from.
* :mod:`resume`: resuming a run, sharding it over processes, merging their files.
* :mod:`markdown`: the pieces of the markdown tables (cells, marks).
* :mod:`cli`: command-line pieces (name lists, ``--fused-config``).
* :mod:`run`: the run loop's pieces (log lines, error text, fatal device errors, time limit).

Importing natten_jax loads JAX: a script sets JAX's environment variables
(``XLA_PYTHON_CLIENT_PREALLOCATE``) before it imports the harness.
"""
