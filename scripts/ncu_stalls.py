"""Where a kernel's warps stall, per SASS instruction, from an Nsight Compute report's source page.

Reads the CSV that `ncu -i REPORT.ncu-rep --page source --csv --print-source sass` writes (one
row per SASS instruction, with the warp-state sampling columns) and prints:
- the stall samples per opcode (which kind of instruction the warps wait on), and
- the instructions holding the most samples, with their address, text and the largest sampled
  reasons where the report breaks them down,
until --cover of all samples is listed (at most --top rows).

    python3 scripts/ncu_stalls.py ncu_source.csv [--top 40] [--cover 0.8]

Column names differ between Nsight Compute versions, so they are matched loosely: the SASS text
is the column named "Source", the samples the first column whose name has "Sampling" and "All"
in it (else "Sampling"), the reasons any numeric column whose name starts with "stall_" or
holds "pcsamp_warps_issue_stalled".
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str):
    """(column names, rows) of the first table in the file whose header has a "Source" column."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    for i, r in enumerate(rows):
        names = [c.strip().strip("#").strip() for c in r]
        if "Source" in names:
            body = [x for x in rows[i + 1:] if len(x) == len(names)]
            return names, body
    raise ValueError(f"{path}: no header row with a 'Source' column")


def columns(names):
    """Indices of the SASS text, the address (or None), the samples and the reason columns."""
    src = names.index("Source")
    addr = next((i for i, n in enumerate(names) if n.lower() == "address"), None)
    sampling = [i for i, n in enumerate(names) if "Sampling" in n]
    if not sampling:
        raise ValueError("no warp-state sampling column (was the report taken with --set full?)")
    total = next((i for i in sampling if "All" in names[i]), sampling[0])
    reasons = [i for i, n in enumerate(names)
               if n.startswith("stall_") or "pcsamp_warps_issue_stalled" in n]
    return src, addr, total, reasons


def opcode(sass: str) -> str:
    """The opcode without predicate and modifiers: "@!P0 FMNMX.FTZ R1, ..." -> "FMNMX"."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def summarize(names, body, top: int, cover: float) -> str:
    src, addr, total, reasons = columns(names)
    samples = [_num(r[total]) for r in body]
    whole = sum(samples)
    if whole <= 0:
        return "no stall samples in the report"
    out = [f"{whole:.0f} samples over {len(body)} instructions ({names[total]})", "", "per opcode:"]
    per_op = collections.Counter()
    for r, s in zip(body, samples):
        per_op[opcode(r[src])] += s
    for op, s in per_op.most_common(15):
        out.append(f"  {op:<24}{s / whole:7.1%}")
    out += ["", "instructions with the most samples:"]
    seen = 0.0
    for k in sorted(range(len(body)), key=lambda k: -samples[k])[:top]:
        r = body[k]
        why = sorted(((_num(r[i]), names[i]) for i in reasons), reverse=True)[:3]
        why_text = ", ".join(f"{n.replace('stall_', '')} {v:.0f}" for v, n in why if v > 0)
        where = r[addr] if addr is not None else f"#{k}"
        out.append(f"  {where:>8} {samples[k] / whole:6.1%}  {r[src].strip()[:64]:<64}  {why_text}")
        seen += samples[k]
        if seen >= cover * whole:
            break
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--cover", type=float, default=0.8, help="stop once this share is listed")
    a = ap.parse_args(argv)
    try:
        names, body = load(a.csv)
        print(summarize(names, body, a.top, a.cover))
    except (OSError, ValueError) as e:
        print(f"ncu_stalls: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
