"""scripts/kernel_resources.py: the ptxas -v parser and the regression rule (CPU; CI runs the
script itself against src/cuda/kernel_resources.json)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "kernel_resources", os.path.join(ROOT, "scripts", "kernel_resources.py"))
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

PTXAS = """\
ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'
ptxas info    : Function properties for _Z1kv
    88 bytes stack frame, 116 bytes spill stores, 140 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 88 bytes cumulative stack size
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z1jv' for 'sm_90a'
ptxas info    : Function properties for _Z1jv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 2 barriers
"""


def test_parse_reads_entries_only():
    got = kr.parse(PTXAS)
    assert set(got) == {"_Z1kv", "_Z1jv"}  # the non-inlined helper is not a kernel
    assert got["_Z1kv"] == {"stack": 88, "spill_stores": 116, "spill_loads": 140,
                            "registers": 168}
    assert got["_Z1jv"]["spill_stores"] == 0 and got["_Z1jv"]["registers"] == 128


def test_compare_flags_spills_registers_and_membership():
    table = {"a": {"registers": 168, "spill_stores": 0, "spill_loads": 0},
             "b": {"registers": 128, "spill_stores": 16, "spill_loads": 16},
             "gone": {"registers": 1, "spill_stores": 0, "spill_loads": 0}}
    now = {"a": {"registers": 168, "spill_stores": 80, "spill_loads": 104},
           "b": {"registers": 126, "spill_stores": 0, "spill_loads": 16},
           "new": {"registers": 64, "spill_stores": 0, "spill_loads": 0}}
    fails, notes = kr.compare(table, now)
    assert any("spill_stores 0 -> 80: a" in f for f in fails)
    assert any("spill_loads 0 -> 104: a" in f for f in fails)
    assert any("no longer built: gone" in f for f in fails)
    assert any("not in the table: new" in f for f in fails)
    assert not any(": b" in f for f in fails)
    assert "registers 128 -> 126: b" in notes and "spill_stores 16 -> 0: b" in notes
    assert kr.compare(table, table) == ([], [])


def test_table_matches_the_sources():
    """The checked-in table has ptxas figures for every kernel it lists (whether it matches
    the sources is the CI step's check: it compiles them)."""
    with open(kr.TABLE) as fh:
        data = json.load(fh)
    assert data["arch"] == "90a"
    kernels = data["kernels"]
    assert kernels, "empty table"
    for name, res in kernels.items():
        assert {"registers", "spill_stores", "spill_loads"} <= set(res), name
    # The 16-bit sm90 backward must not spill (the regression this table exists for).
    sm90_bwd = [n for n in kernels if "sm90::bwd" in n]
    assert sm90_bwd and all(kernels[n]["spill_stores"] == 0 for n in sm90_bwd)
