#!/usr/bin/env bash
# A/B of the headline problems on the GPU machine: tree A (the sources of another commit,
# unpacked at $AB_TREE, default .ab/base: `git archive REV src natten_jax CMakeLists.txt
# pyproject.toml scripts benchmarks README.md | tar -x -C .ab/base`, carried) against this
# checkout (B). Each tree is built by its own scripts/gpu_check.sh (SKIP_BUILD=1: reuse the
# modules already built next to the sources); then scripts/headline_times.py times both in
# separate processes, alternately (A B A B ...), and the medians per problem and mode are printed
# last with their ratio. Every log and JSON is also packed into $OUT/ab.tgz (the device tool
# brings back only a few files).
#
#   AB_ROUNDS=3 AB_PROBLEMS="2d_gen 3d_video 1d_long 2d_nat_t" [AB_MODES=fwd] bash scripts/gpu_headline_ab.sh
#
# AB_MODES: "fwd", "fwdbwd" or both (default): the modes headline_times.py times.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
A=${AB_TREE:-.ab/base}
ROUNDS=${AB_ROUNDS:-3}
PROBLEMS=${AB_PROBLEMS:-2d_gen 3d_video 1d_long 2d_nat_t}
MODES=${AB_MODES:-fwd fwdbwd}
mkdir -p "$OUT/ab"
export PYTHONUNBUFFERED=1

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  OUT="$OUT/ab/B" TESTS=0 bash scripts/gpu_check.sh > "$OUT/ab/B_build.log" 2>&1 ||
    { tail -20 "$OUT/ab/B_build.log"; echo "B build failed"; exit 1; }
  (cd "$A" && OUT="$OUT/ab/A" TESTS=0 bash scripts/gpu_check.sh) > "$OUT/ab/A_build.log" 2>&1 ||
    { tail -20 "$OUT/ab/A_build.log"; echo "A build failed"; exit 1; }
fi
for ((r = 0; r < ROUNDS; r++)); do
  for v in A B; do
    tree=$PWD
    [ "$v" = A ] && tree=$(cd "$A" && pwd)
    # shellcheck disable=SC2086
    PYTHONPATH="$tree" python3 scripts/headline_times.py --problems $PROBLEMS --modes $MODES \
      --out "$OUT/ab/$v.$r.json" > "$OUT/ab/$v.$r.log" 2>&1 ||
      { echo "$v round $r failed"; tail -5 "$OUT/ab/$v.$r.log"; }
  done
done
python3 - "$OUT/ab" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
ms, where = {}, {}
for v in "AB":
    for r in range(rounds):
        try:
            d = json.load(open(f"{out}/{v}.{r}.json"))
        except (OSError, ValueError):
            continue
        where[v] = d["natten_jax"]
        for row in d["rows"]:
            ms.setdefault((row["problem"], row["mode"]), {}).setdefault(v, []).append(row["ms"])
print("A:", where.get("A"), " B:", where.get("B"))
print(f"{'problem':<18}{'mode':<8}{'A ms':>9}{'B ms':>9}{'B/A':>7}  rounds A | B")
for (p, m), d in ms.items():
    a, b = (statistics.median(d[v]) if d.get(v) else float("nan") for v in "AB")
    runs = " ".join(f"{x:.3f}" for x in d.get("A", [])) + " | " + " ".join(f"{x:.3f}" for x in d.get("B", []))
    print(f"{p:<18}{m:<8}{a:9.3f}{b:9.3f}{b / a:7.3f}  {runs}")
PY
tar czf "$OUT/ab.tgz" -C "$OUT" ab
