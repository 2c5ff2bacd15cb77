#!/usr/bin/env bash
# One GPU-machine call: build + GPU tests (scripts/gpu_check.sh), then the steps named in
# $STEPS (comma-separated), each bounded in time; every log is packed into $OUT/logs.tgz (the
# device tool returns at most 8 files) and a summary is printed last.
#
#   STEPS=sanitize,bench bash scripts/gpu_session.sh
#
# The build comes first; the sanitize step then runs in the background, beside the GPU tests
# (PYTEST_SHARDS pytest processes, default 4); the other steps run after both, one by one.
#
# Steps:
#   sanitize     compute-sanitizer memcheck + racecheck on scripts/sanitize_fna.py, twice side by
#                side: default kernels, and the sm90 forward + backward (NATTEN_JAX_FNA_IMPL=sm90,
#                NATTEN_JAX_FNA_BWD_IMPL=sm90); SANITIZE_SETS=default or sm90 runs one of them
#   bench        python -m benchmarks.bench_na $BENCH_ARGS (fwd+bwd, peers)
#   ragged       python -m benchmarks.bench_ragged $RAGGED_ARGS (the cost of valid_extent)
#
# $OUT/results/ starts as a copy of benchmarks/results/: pass `--results $OUT/results/` in
# BENCH_ARGS / RAGGED_ARGS to merge a run into the records there; they come back in the archive
# (copy the changed files into benchmarks/results/).
#   sm90         python scripts/check_fna_sm90.py (if present)
#   unfused      python -m benchmarks.unfused_bench $UNFUSED_ARGS (if present)
#   all          bash scripts/gpu_bench_all.sh (if present: autotune demo, sweep, throughput)
#   ncu          Nsight Compute (--set full) on one launch of the kernels matching $NCU_KERNEL
#                (default fna_fwd) in `benchmarks.bench_na $NCU_ARGS` (default: 2d_nat_t forward,
#                fused); the report, its details page and its raw metrics go into the archive, the
#                occupancy, throughput and stall lines into the summary, and the stall samples
#                per SASS instruction (its source page through scripts/ncu_stalls.py)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/session_summary.txt"
: > "$SUMMARY"
mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/"

run_step() {  # name, limit_s, command...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf "%-10s rc=%-4s %4ss  (%s)\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" \
    >> "$SUMMARY"
  return $rc
}

TESTS=0 bash scripts/gpu_check.sh > "$OUT/gpu_build.log" 2>&1
build_rc=$?
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
IFS=, read -ra steps <<< "${STEPS:-}"

sanitize_chain() {  # tag, env assignments...: memcheck then racecheck under that environment
  local tag=$1
  shift
  run_step "memcheck_$tag" "${MEMCHECK_LIMIT_S:-240}" env "$@" compute-sanitizer --tool memcheck \
    --error-exitcode 9 python3 scripts/sanitize_fna.py
  run_step "racecheck_$tag" "${RACECHECK_LIMIT_S:-300}" env "$@" compute-sanitizer --tool racecheck \
    --error-exitcode 9 python3 scripts/sanitize_fna.py
}
bg=()
if [ "$build_rc" = 0 ] && [[ ",${STEPS:-}," == *,sanitize,* ]]; then
  # SANITIZE_SETS picks the chains (default both)
  if [[ ",${SANITIZE_SETS:-default,sm90}," == *,default,* ]]; then
    sanitize_chain default XLA_PYTHON_CLIENT_PREALLOCATE=false & bg+=($!)
  fi
  if [[ ",${SANITIZE_SETS:-default,sm90}," == *,sm90,* ]]; then
    sanitize_chain sm90 XLA_PYTHON_CLIENT_PREALLOCATE=false NATTEN_JAX_FNA_IMPL=sm90 \
      NATTEN_JAX_FNA_BWD_IMPL=sm90 & bg+=($!)
  fi
fi
if [ "$build_rc" = 0 ]; then
  SKIP_BUILD=1 PYTEST_SHARDS=${PYTEST_SHARDS:-4} bash scripts/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
  check_rc=$?
else
  cp "$OUT/gpu_build.log" "$OUT/gpu_check.log"
  check_rc=$build_rc
fi
for p in "${bg[@]}"; do wait "$p"; done
for s in "${steps[@]}"; do
  case $s in
    sanitize) ;;  # ran beside the tests
    bench)
      run_step bench_na "${BENCH_LIMIT_S:-300}" python3 -m benchmarks.bench_na \
        ${BENCH_ARGS:---backends fused,fused_sm80,fused_sm90 --peers cudnn --time-limit-s 200} \
        --out "$OUT/bench_na.json" ;;
    ragged)
      run_step bench_ragged "${RAGGED_LIMIT_S:-240}" python3 -m benchmarks.bench_ragged \
        ${RAGGED_ARGS:---time-limit-s 180} --out "$OUT/bench_ragged.json" ;;
    sm90)
      [ -f scripts/check_fna_sm90.py ] && run_step sm90 "${SM90_LIMIT_S:-150}" python3 scripts/check_fna_sm90.py ;;
    unfused)
      [ -f benchmarks/unfused_bench.py ] && run_step unfused "${UNFUSED_LIMIT_S:-200}" \
        python3 -m benchmarks.unfused_bench ${UNFUSED_ARGS:---time-limit-s 150} \
        --out "$OUT/unfused.json" --md "$OUT/unfused.md" ;;
    all)
      # (its own STEPS: ALL_STEPS, default all of them)
      [ -f scripts/gpu_bench_all.sh ] && run_step bench_all "${ALL_LIMIT_S:-480}" env SKIP_BUILD=1 \
        STEPS="${ALL_STEPS:-autotune,sweep,models}" bash scripts/gpu_bench_all.sh ;;
    ncu)
      run_step ncu "${NCU_LIMIT_S:-180}" ncu --set full -k "regex:${NCU_KERNEL:-fna_fwd}" \
        -s "${NCU_SKIP:-2}" -c "${NCU_COUNT:-1}" -f -o "$OUT/ncu" python3 -m benchmarks.bench_na \
        ${NCU_ARGS:---problems 2d_nat_t --fwd-only --backends fused --peers none --reps 3 --no-loop} \
        && ncu -i "$OUT/ncu.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1 \
        && ncu -i "$OUT/ncu.ncu-rep" --page raw --csv > "$OUT/ncu_raw.csv" 2>&1 \
        && { ncu -i "$OUT/ncu.ncu-rep" --page source --csv --print-source sass \
               > "$OUT/ncu_source.csv" 2>&1; python3 scripts/ncu_stalls.py "$OUT/ncu_source.csv" \
               > "$OUT/ncu_stalls.txt" 2>&1; true; } ;;
    "") ;;
    *) echo "unknown step $s" >> "$SUMMARY" ;;
  esac
done

# Everything into one archive; the short texts stay beside it.
(cd "$OUT" && tar czf /tmp/logs.tgz --exclude=logs.tgz . && mv /tmp/logs.tgz "$OUT/logs.tgz")
echo "---- gpu_check (tail)"
tail -25 "$OUT/gpu_check.log"
for f in "$OUT"/bench_na.log "$OUT"/bench_ragged.log "$OUT"/sm90.log "$OUT"/unfused.log "$OUT"/bench_all.log; do
  [ -f "$f" ] && { echo "---- $(basename "$f") (tail)"; tail -30 "$f" | cut -c1-160; }
done
for f in "$OUT"/memcheck_*.log "$OUT"/racecheck_*.log; do
  [ -f "$f" ] && { echo "---- $(basename "$f")"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|rank|Error" "$f" | head -12; }
done
if [ -f "$OUT/ncu_details.txt" ]; then
  echo "---- ncu (details, selected lines)"
  grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Theoretical Occ|Achieved Occ|Block Limit|Compute \(SM\) Th|Memory Throughput|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc A|L1/TEX Hit|L2 Hit|Waves Per SM|Eligible Warps|No Eligible|Shared Memory Configuration Size|Dynamic Shared" \
    "$OUT/ncu_details.txt" | cut -c1-150 | head -40
  echo "---- ncu (stall reasons, cycles per issued instruction)"
  python3 - "$OUT/ncu_raw.csv" <<'PY' || true
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
names, vals = rows[head], rows[head + 2]
pref = "smsp__average_warps_issue_stalled_"
stalls = sorted(((float(v.replace(",", "")), n[len(pref):]) for n, v in zip(names, vals)
                 if n.startswith(pref) and n.endswith("_per_issue_active.ratio")
                 and v.replace(",", "").replace(".", "").isdigit()), reverse=True)
print("  " + ", ".join(f"{n.replace('_per_issue_active.ratio', '')} {v:.2f}" for v, n in stalls[:10]))
PY
fi
if [ -f "$OUT/ncu_stalls.txt" ]; then
  echo "---- ncu (stall samples per SASS instruction: scripts/ncu_stalls.py)"
  head -45 "$OUT/ncu_stalls.txt" | cut -c1-170
fi
echo "================ session summary ================"
echo "gpu_check rc=$check_rc"
cat "$SUMMARY"
# only the archive and the summary stay, so that everything comes back (8 files at most)
find "$OUT" -maxdepth 1 -type f ! -name logs.tgz ! -name session_summary.txt -delete
find "$OUT" -mindepth 1 -type d -exec rm -rf {} + 2>/dev/null
ls "$OUT"
