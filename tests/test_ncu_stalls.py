"""scripts/ncu_stalls.py on a hand-made source-page CSV laid out as Nsight Compute writes it
(a preamble line, quoted cells, thousands separators, predicated instructions)."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "ncu_stalls", os.path.join(os.path.dirname(__file__), "..", "scripts", "ncu_stalls.py"))
ncu_stalls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_stalls)

CSV = '''"==PROF== report"
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_wait","stall_barrier"
"0x10","FMNMX R1, R2, R3, !PT","100","90","80","0"
"0x20","@P0 BAR.SYNC.DEFER_BLOCKING 0x3, 0x100","1,500","1,400","0","1,400"
"0x30","MUFU.EX2 R4, R5","300","200","150","0"
"0x40","FMNMX.FTZ R6, R7, R8, !PT","100","90","70","0"
'''


def test_summary(tmp_path):
    path = tmp_path / "source.csv"
    path.write_text(CSV)
    names, body = ncu_stalls.load(str(path))
    assert len(body) == 4
    text = ncu_stalls.summarize(names, body, top=10, cover=0.99)
    lines = text.splitlines()
    assert lines[0].startswith("2000 samples over 4 instructions")
    start = lines.index("per opcode:") + 1
    ops = [ln.split() for ln in lines[start:lines.index("", start)]]
    assert ops == [["BAR", "75.0%"], ["MUFU", "15.0%"], ["FMNMX", "10.0%"]]
    top = [ln for ln in lines if "0x" in ln]
    assert top[0].split()[:3] == ["0x20", "75.0%", "@P0"] and "barrier 1400" in top[0]
    assert top[1].split()[:2] == ["0x30", "15.0%"] and "wait 150" in top[1]
    # --cover stops the list once that share is listed
    short = ncu_stalls.summarize(names, body, top=10, cover=0.7)
    assert len([ln for ln in short.splitlines() if "0x" in ln]) == 1


def test_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('"Address","Source","Instructions Executed"\n"0x10","NOP","1"\n')
    names, body = ncu_stalls.load(str(path))
    with pytest.raises(ValueError, match="sampling"):
        ncu_stalls.summarize(names, body, 10, 0.8)
    path.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(ValueError, match="Source"):
        ncu_stalls.load(str(path))
    assert ncu_stalls.main([str(path)]) == 1
