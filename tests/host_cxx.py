"""Compiles a C++ program against the device headers (src/cuda/include) with the host compiler,
for tests that check host-includable headers (window.cuh, neighborhood.cuh, fast_div.h) on
machines without a GPU; the test is skipped where no C++ compiler is installed."""

import os
import shutil
import subprocess

import pytest

INCLUDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src",
                       "cuda", "include")


def compile_program(tmp_path, source: str, name: str, opt: str = "-O1") -> str:
    """The path of the executable built from `source` (warnings are errors)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / f"{name}.cc"
    src.write_text(source)
    exe = tmp_path / name
    subprocess.run([cxx, "-std=c++17", opt, "-Wall", "-Wno-unknown-pragmas", "-Werror", "-I",
                    INCLUDE, str(src), "-o", str(exe)], check=True, capture_output=True)
    return str(exe)
