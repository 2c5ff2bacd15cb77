"""The ahead-of-time compiled call: compilation timed (and locked) apart from the device calls."""

from __future__ import annotations


class Compiled:
    """A jitted function and its next arguments.

    ``compile()`` lowers and compiles it ahead of time and returns its memory analysis
    (``temp_bytes``, ``argument_bytes``, ``output_bytes``; empty where the backend does not say);
    calling runs the compiled executable (or, before compile(), the jitted function) on
    ``args_fn()`` and hands the result to ``keep`` (e.g. to carry a training state). ``args_fn``
    takes ``peek=True`` for the arguments of the next call without advancing.
    """

    def __init__(self, fn, args_fn, keep=None):
        self.fn, self.args_fn, self.keep, self.exe = fn, args_fn, keep, None

    def compile(self) -> dict:
        self.exe = self.fn.lower(*self.args_fn(peek=True)).compile()
        try:
            mem = self.exe.memory_analysis()
            return {"temp_bytes": int(mem.temp_size_in_bytes),
                    "argument_bytes": int(mem.argument_size_in_bytes),
                    "output_bytes": int(mem.output_size_in_bytes)}
        except Exception:  # noqa: BLE001 - not every backend / version reports it
            return {}

    def __call__(self):
        out = (self.exe or self.fn)(*self.args_fn())
        return self.keep(out) if self.keep else out
