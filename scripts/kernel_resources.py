"""Registers and spills of the fused kernels, checked against src/cuda/kernel_resources.json.

A kernel that starts to spill can lose 5-10% with no other sign (the sm90 dK/dV kernel did, from
an inlined early exit: docs/perf-log.md), and no GPU is needed to see it: ``ptxas -v`` tells.
This compiles every ``src/cuda/fna/*.cu`` for the table's architecture (sm_90a, CI's) with
``-Xptxas -v`` (no object kept), reads each kernel's registers and spill bytes, and compares
them with the table:

* a kernel that spills more than the table says (stores or loads), or uses more registers than
  it (kernels at their launch-bound limit spill next), fails the check;
* a kernel missing from the table, or in the table but no longer built, fails too (update it);
* fewer spills or registers pass and are printed (update the table to keep the gain).

    python scripts/kernel_resources.py            # check (exit 1 on a regression)
    python scripts/kernel_resources.py --update   # rewrite the table from this build

Uses nvcc from PATH, the XLA FFI headers of the installed jax and the CUTLASS headers of the
nvidia-cutlass wheel when present, as CMakeLists.txt does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "src", "cuda", "kernel_resources.json")
SOURCES = os.path.join(ROOT, "src", "cuda", "fna", "*.cu")


def include_dirs():
    import importlib.util

    import jax.ffi

    dirs = [os.path.join(ROOT, "src", "cuda", "include"), jax.ffi.include_dir()]
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        pkg = list(spec.submodule_search_locations)[0]
        dirs += [os.path.join(pkg, "source", "include"),
                 os.path.join(pkg, "source", "tools", "util", "include")]
    return dirs


def compile_one(src: str, arch: str, incs) -> str:
    """ptxas -v output of one source for sm_<arch>."""
    cmd = ["nvcc", "-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr",
           "--expt-extended-lambda", f"--generate-code=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-x", "cu", "-c", src, "-o", os.devnull]
    for d in incs:
        cmd += ["-I", d]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
    return r.stderr


def parse(text: str) -> dict:
    """{mangled name: {registers, spill_stores, spill_loads, stack}} of the entry functions
    (kernels); non-inlined device functions are listed without registers."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            out[cur] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1) if m.group(1) in out else None
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                            spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["registers"] = int(m.group(1))
    return out


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = r.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def measure(arch: str, jobs: int) -> dict:
    incs = include_dirs()
    srcs = sorted(glob.glob(SOURCES))
    kernels = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        for src, text in zip(srcs, ex.map(lambda s: compile_one(s, arch, incs), srcs)):
            for name, res in parse(text).items():
                res["source"] = os.path.relpath(src, ROOT)
                kernels[name] = res
    names = demangle(sorted(kernels))
    return {names[n]: kernels[n] for n in sorted(kernels)}


def compare(table: dict, now: dict):
    """-> (failures, notes): lines describing regressions and improvements."""
    fails, notes = [], []
    for name in sorted(set(table) | set(now)):
        if name not in now:
            fails.append(f"no longer built: {name}")
            continue
        if name not in table:
            fails.append(f"not in the table: {name} {now[name]}")
            continue
        old, new = table[name], now[name]
        for key in ("spill_stores", "spill_loads", "registers"):
            a, b = old.get(key, 0), new.get(key, 0)
            if b > a:
                fails.append(f"{key} {a} -> {b}: {name}")
            elif b < a:
                notes.append(f"{key} {a} -> {b}: {name}")
    return fails, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", help="ptxas target (default: the table's; 90a for --update "
                    "without a table)")
    ap.add_argument("--update", action="store_true", help="rewrite the table from this build")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    if not shutil.which("nvcc"):
        print("kernel_resources: no nvcc on PATH", file=sys.stderr)
        return 2
    data = None
    if os.path.exists(TABLE):
        with open(TABLE) as fh:
            data = json.load(fh)
    arch = args.arch or (data or {}).get("arch", "90a")
    if not args.update and data is None:
        print(f"kernel_resources: no table at {os.path.relpath(TABLE, ROOT)} (--update writes "
              "one)", file=sys.stderr)
        return 2
    if not args.update and data.get("arch") != arch:
        print(f"kernel_resources: the table is for sm_{data.get('arch')}, not sm_{arch}",
              file=sys.stderr)
        return 2
    now = measure(arch, args.jobs)
    if args.update:
        data = {"about": ("ptxas -v of src/cuda/fna/*.cu for sm_" + arch + ", written by "
                          "`python scripts/kernel_resources.py --update`; checked in CI (a "
                          "kernel that spills or uses more registers than listed fails)."),
                "arch": arch, "kernels": now}
        with open(TABLE, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=False)
            fh.write("\n")
        print(f"kernel_resources: {len(now)} kernels written to {os.path.relpath(TABLE, ROOT)}")
        return 0
    fails, notes = compare(data["kernels"], now)
    for line in notes:
        print("better:", line)
    for line in fails:
        print("REGRESSION:", line)
    print(f"kernel_resources: {len(now)} kernels, {len(fails)} regressions, {len(notes)} gains")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
