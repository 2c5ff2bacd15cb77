#!/usr/bin/env bash
# A/B timing of two kernel trees in one GPU-machine call. B is this checkout; A is this
# checkout with $AB_PATCH applied (make it with `git diff B A -- src > ab/a.patch`; the device
# copy has no .git). Both modules are built (B first, and B's GPU tests run as gpu_check.sh
# runs them: PYTEST_ARGS, PYTEST_SHARDS, TESTS=0 to skip), then the same benchmark runs in
# separate processes alternately, A B A B ..., and the per-problem medians are printed last.
#
#   AB_PATCH=ab/a.patch AB_ARGS="--problems 2d_nat_t --fwd-only --backends fused --peers none" \
#     bash scripts/gpu_ab.sh
#
# Environment: AB_ROUNDS (default 3), OUT (default /tmp/out; the logs are packed in
# $OUT/ab_logs.tgz), AB_EXTRA: a command run after the timing under each module (A then B),
# e.g. an ncu or a pytest line.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ab/A /tmp/ab/B
export PYTHONUNBUFFERED=1
ROUNDS=${AB_ROUNDS:-3}
ARGS=${AB_ARGS:---problems 2d_nat_t --fwd-only --backends fused --peers none}
: "${AB_PATCH:?AB_PATCH: a patch that turns this tree into variant A}"

OUT="$OUT/B" bash scripts/gpu_check.sh > "$OUT/B_check.log" 2>&1
echo "B: build + tests exit $?"; tail -6 "$OUT/B_check.log"
cp natten_jax/_C*.so /tmp/ab/B/ || { echo "B build failed"; exit 1; }
patch -p1 --forward < "$AB_PATCH" > "$OUT/patch.log" 2>&1 || { cat "$OUT/patch.log"; exit 1; }
OUT="$OUT/A" TESTS=0 bash scripts/gpu_check.sh > "$OUT/A_check.log" 2>&1
echo "A: build exit $?"; grep -E "build|module" "$OUT/A_check.log" | tail -3
cp natten_jax/_C*.so /tmp/ab/A/ || { echo "A build failed"; exit 1; }
patch -p1 -R < "$AB_PATCH" >> "$OUT/patch.log" 2>&1

export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
for ((r = 0; r < ROUNDS; r++)); do
  for v in A B; do
    cp /tmp/ab/$v/_C*.so natten_jax/
    # shellcheck disable=SC2086
    python3 -m benchmarks.bench_na $ARGS --out "$OUT/$v.$r.json" > "$OUT/$v.$r.log" 2>&1 ||
      { echo "$v round $r failed"; tail -5 "$OUT/$v.$r.log"; }
  done
done
if [ -n "${AB_EXTRA:-}" ]; then
  for v in A B; do
    cp /tmp/ab/$v/_C*.so natten_jax/
    bash -c "$AB_EXTRA" > "$OUT/extra_$v.log" 2>&1
    echo "extra under $v: exit $?"; tail -4 "$OUT/extra_$v.log"
  done
fi
cp /tmp/ab/B/_C*.so natten_jax/
(cd "$OUT" && tar czf /tmp/ab_logs.tgz . && mv /tmp/ab_logs.tgz "$OUT/ab_logs.tgz")
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
ms = {}
for v in "AB":
    for r in range(rounds):
        try:
            rows = json.load(open(f"{out}/{v}.{r}.json"))["rows"]
        except (OSError, ValueError):
            continue
        for row in rows:
            for mode in ("fwd", "fwd_bwd"):
                t = (row.get(mode) or {}).get("ms")
                if t:
                    ms.setdefault((row["problem"], row["impl"], mode), {}).setdefault(v, []).append(t)
print(f"{'problem':<14}{'impl':<12}{'mode':<8}{'A ms':>9}{'B ms':>9}{'A/B':>7}  rounds A | B")
for (p, i, m), d in sorted(ms.items()):
    a, b = (statistics.median(d[v]) if d.get(v) else float("nan") for v in "AB")
    runs = " ".join(f"{x:.3f}" for x in d.get("A", [])) + " | " + " ".join(f"{x:.3f}" for x in d.get("B", []))
    print(f"{p:<14}{i:<12}{m:<8}{a:9.3f}{b:9.3f}{a / b:7.3f}  {runs}")
PY
find "$OUT" -mindepth 1 ! -name ab_logs.tgz -exec rm -rf {} + 2>/dev/null
ls "$OUT"
