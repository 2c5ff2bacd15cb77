"""Running a test file's worker in a subprocess with several fake CPU devices.

The pytest process has already initialised JAX with one CPU device, so multi-device checks run
the test file itself as a script with ``--xla_force_host_platform_device_count`` set; the worker
prints one ``RESULTS <json>`` line. ``NATTEN_JAX_REQUIRE_SHARDING=1`` turns a skip (too few
devices) into a failure, for CI.
"""

import json
import os
import subprocess
import sys
import time

import pytest

REQUIRE_ENV = "NATTEN_JAX_REQUIRE_SHARDING"
N_DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def skip_or_fail(msg):
    if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
        pytest.fail(f"{msg} ({REQUIRE_ENV} is set)")
    pytest.skip(msg)


def run_worker(script, label, xla_flags=(), args=(), drop_env=()):
    """Runs ``python script *args`` on N_DEVICES fake CPU devices; returns its RESULTS dict."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                                 f"--xla_force_host_platform_device_count={N_DEVICES}",
                                 *xla_flags]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    for name in drop_env:
        env.pop(name, None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{label} worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    res = json.loads(lines[-1][len("RESULTS "):])
    res["_seconds"] = round(time.time() - t0, 1)
    if "skip" in res:
        skip_or_fail(res["skip"])
    return res
