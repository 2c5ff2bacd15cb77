#!/usr/bin/env bash
# All benchmarks in one command on the GPU machine, each under its own time limit (7.5 minutes
# in all by default); results under $OUT (8 files at most), a summary table printed last.
#
#   bash scripts/gpu_check.sh            # builds natten_jax/_C*.so next to the sources (once)
#   bash scripts/gpu_bench_all.sh        # or, in the same device call: STEPS=all bash
#                                        #   scripts/gpu_session.sh
#
# Steps (STEPS, comma-separated, default "autotune,sweep,models"):
#   autotune  python -m benchmarks.autotune_demo: per-problem tiles, before/after ms, and a second
#             process that must reuse the cache without timing (AUTOTUNE_ARGS, AUTOTUNE_LIMIT_S)
#   sweep     python -m benchmarks.sweep --size medium --dtype float16 --backends
#             fused,gemm,naive --peers cudnn,xla (forward and forward+backward; naive only on
#             small problems), with its plots (SWEEP_ARGS, SWEEP_LIMIT_S); the whole medium grid
#             with every backend takes ~30 device minutes: add `--resume <earlier sweep.json>`
#             to SWEEP_ARGS to go on where a run stopped
#   models    python -m benchmarks.model_throughput: NAT/DiNAT images/s (MODELS_ARGS,
#             MODELS_LIMIT_S; default nat_mini,dinat_tiny,nat_tiny x fused,dense,reference x bf16
#             x infer,train at batch 128; `--only variant:mode[:backend[:dtype]]` picks rows and
#             `--resume <earlier model_throughput.json>` keeps rows measured before);
#             MODELS_WORKERS=n runs n processes side
#             by side (--shard i/n, each 0.92/n of GPU memory; they compile in parallel and
#             take turns on the GPU: --gpu-lock) and merges their tables;
#             MODELS_PLAN="FRAC@ROWS;FRAC@ROWS;..." instead gives each worker its own share of GPU
#             memory and its own rows (ROWS as --only takes them), e.g. one large worker for the
#             training steps of the large variants beside small ones for inference rows
# Each *_LIMIT_S is the step's time limit (the tools start no new work after it, or, for the
# autotune demo, when its second process would not fit), cut to what TOTAL_LIMIT_S (default 450)
# leaves; a step still running HARD_MARGIN_S (default 45) seconds after its limit is killed
# (its JSON and markdown, rewritten as it goes, are kept). *_ARGS replace a step's default
# arguments (output paths and the time limit are always added).
#
# Environment:
#   OUT          results (default /tmp/out): bench_all_detail.log (every log), summary.md (the
#                three markdown reports and the summary), autotune_demo.json, sweep.json,
#                model_throughput.json, and the sweep's three PNG plots
#   PYTHON       default python3
#   SKIP_BUILD=1 never build; otherwise, when natten_jax/_C*.so is missing, build it first
#                through scripts/gpu_check.sh (tests collected, not run; its logs go to the
#                detail log)
#   FUSED_CONFIG the fused backend's configuration of every step, as their --fused-config
#                takes it (e.g. "forward_impl=sm90,backward_impl=sm90"; default: natten_jax's)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-autotune,sweep,models}
TOTAL=${TOTAL_LIMIT_S:-450}
MARGIN=${HARD_MARGIN_S:-45}
AUTOTUNE_LIMIT_S=${AUTOTUNE_LIMIT_S:-120}
SWEEP_LIMIT_S=${SWEEP_LIMIT_S:-100}
MODELS_LIMIT_S=${MODELS_LIMIT_S:-170}
FUSED=(--fused-config "${FUSED_CONFIG:-}")
AUTOTUNE_ARGS=${AUTOTUNE_ARGS:---problems 2d_nat_t,2d_gen,1d_long,3d_video,2d_nat_t_dilated \
  --thorough 2d_nat_t}
SWEEP_ARGS=${SWEEP_ARGS:---size medium --dtype float16 --backends fused,gemm,naive --peers cudnn,xla}
MODELS_ARGS=${MODELS_ARGS:---variants nat_mini,dinat_tiny,nat_tiny --backends fused,dense,reference \
  --dtypes bf16 --modes infer,train --batch 128 --reps 5 --budget-s 5}
WORK=$(mktemp -d /tmp/nj_bench_all.XXXXXX)
LOG="$OUT/bench_all_detail.log"
mkdir -p "$OUT"
: > "$LOG"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the steps (and the tuner's second process) share
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
compgen -G ".whl/*.whl" > /dev/null && [ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
now() { date +%s; }
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
T0=$(now)

{
  echo "== $(date -u) on $(hostname); steps $STEPS; out $OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} >> "$LOG"

# ---- module (built by scripts/gpu_check.sh)
if ! compgen -G "natten_jax/_C*.so" > /dev/null && [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== building natten_jax/_C (scripts/gpu_check.sh, tests collected only)" | tee -a "$LOG"
  OUT="$WORK/gpu_check" PYTEST_ARGS="--co -q" BENCH=0 bash scripts/gpu_check.sh \
    > "$WORK/gpu_check.log" 2>&1
  tail -8 "$WORK/gpu_check.log" >> "$LOG"
  cat "$WORK/gpu_check/build.log" >> "$LOG" 2>/dev/null
fi
"$PY" -c "from natten_jax import _ffi
print('fused kernels available:', _ffi.cuda_kernels_available(), _ffi.unavailable_reason())" \
  2>&1 | tee -a "$LOG"

declare -A STATUS SECONDS_TAKEN
step_limit() {  # the step's limit, cut to what the total leaves (0: no time left)
  local left=$(( TOTAL - ($(now) - T0) - MARGIN ))
  local limit=$(( $1 < left ? $1 : left ))
  echo $(( limit < 20 ? 0 : limit ))
}
run_step() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  local t0 rc
  if [ "$limit" = 0 ]; then
    STATUS[$name]="skipped: TOTAL_LIMIT_S=$TOTAL spent"
    echo "== $name: ${STATUS[$name]}" | tee -a "$LOG"
    return
  fi
  t0=$(now)
  echo "== $name: $* (limit ${limit} s + ${MARGIN} s)" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 $((limit + MARGIN)) "$@" > "$WORK/$name.out" 2>> "$LOG"
  rc=$?
  SECONDS_TAKEN[$name]=$(( $(now) - t0 ))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="KILLED after $((limit + MARGIN)) s (partial results kept)" ;;
    *) STATUS[$name]="exit $rc" ;;
  esac
  cat "$WORK/$name.out" >> "$LOG"
  echo "== $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s" | tee -a "$LOG"
}

# shellcheck disable=SC2086  # the *_ARGS are word lists
if has_step autotune; then
  lim=$(step_limit "$AUTOTUNE_LIMIT_S")
  run_step autotune "$lim" "$PY" -m benchmarks.autotune_demo $AUTOTUNE_ARGS "${FUSED[@]}" \
    --time-limit-s "$lim" --cache-dir "$WORK/autotune_cache" \
    --out "$OUT/autotune_demo.json" --md "$WORK/autotune_demo.md"
fi
# shellcheck disable=SC2086
if has_step sweep; then
  lim=$(step_limit "$SWEEP_LIMIT_S")
  run_step sweep "$lim" "$PY" -m benchmarks.sweep $SWEEP_ARGS "${FUSED[@]}" --no-progress \
    --time-limit-s "$lim" --out "$OUT/sweep.json" --md "$WORK/sweep.md" --plots "$OUT"
fi
# shellcheck disable=SC2086
models_rows() {  # worker i, memory share, rows, limit: one process per row, in turn
  # (a fresh memory pool each: a pool that held a smaller row's buffers can be too fragmented
  # for a larger row's temporaries), its whole share taken at the start as one region
  # (PREALLOCATE: a pool grown region by region could not place dinat_large's 51 GiB gemm fp32
  # temporary at an 86 or 97 GiB share, and held it at 76 GiB preallocated; H200, session 7);
  # no row starts after the limit
  local i=$1 frac=$2 lim=$4 k=0 row start=$SECONDS list
  IFS=, read -ra list <<< "$3"
  for row in "${list[@]}"; do
    if (( SECONDS - start > lim )); then echo "not started (time limit): $row"; continue; fi
    XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=$frac \
      "$PY" -m benchmarks.model_throughput $MODELS_ARGS --fused-config "${FUSED_CONFIG:-}" \
      --only "$row" --time-limit-s "$lim" \
      --gpu-lock "$WORK/gpu.lock" --out "$OUT/models_parts/$i.$k.json" 2>&1 | grep -v "^|"
    k=$((k + 1))
  done
}
models_sharded() {  # worker processes (each a share of GPU memory), then their merge
  local lim=$1 n=$MODELS_WORKERS pids=() rc=0 i plan=() frac
  [ -n "${MODELS_PLAN:-}" ] && { IFS=';' read -ra plan <<< "$MODELS_PLAN"; n=${#plan[@]}; }
  mkdir -p "$OUT/models_parts"
  for ((i = 0; i < n; i++)); do
    if [ ${#plan[@]} -gt 0 ]; then  # FRAC@ROWS: this worker's memory share and rows
      models_rows "$i" "${plan[$i]%%@*}" "${plan[$i]#*@}" "$lim" > "$OUT/models_parts/$i.log" 2>&1 &
    else  # every n-th row, 0.92 / n of the memory each
      frac=$(awk -v n="$n" 'BEGIN { printf "%.2f", 0.92 / n }')
      XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=$frac \
        "$PY" -m benchmarks.model_throughput $MODELS_ARGS --fused-config "${FUSED_CONFIG:-}" \
        --time-limit-s "$lim" --shard "$i/$n" --gpu-lock "$WORK/gpu.lock" --out "$OUT/models_parts/$i.json" \
        > "$OUT/models_parts/$i.log" 2>&1 &
    fi
    pids+=($!)
  done
  for ((i = 0; i < n; i++)); do
    wait "${pids[$i]}" || rc=$?
    echo "-- worker $i/$n (exit ${rc})"
    cat "$OUT/models_parts/$i.log"
  done
  local parts=()
  for f in "$OUT"/models_parts/*.json; do [ -f "$f" ] && parts+=(--resume "$f"); done
  [ ${#parts[@]} -gt 0 ] || { echo "no model rows measured"; return 1; }
  "$PY" -m benchmarks.model_throughput $MODELS_ARGS --fused-config "${FUSED_CONFIG:-}" \
    --merge "${parts[@]}" \
    --out "$OUT/model_throughput.json" --md "$WORK/model_throughput.md" || rc=$?
  return $rc
}
if has_step models; then
  lim=$(step_limit "$MODELS_LIMIT_S")
  if { [ "${MODELS_WORKERS:-1}" -gt 1 ] || [ -n "${MODELS_PLAN:-}" ]; } && [ "$lim" != 0 ]; then
    export -f models_sharded models_rows
    export MODELS_WORKERS=${MODELS_WORKERS:-1} MODELS_PLAN=${MODELS_PLAN:-} MODELS_ARGS PY WORK OUT \
      FUSED_CONFIG=${FUSED_CONFIG:-}
    run_step models "$lim" bash -c 'models_sharded "$0"' "$lim"
  else
    run_step models "$lim" "$PY" -m benchmarks.model_throughput $MODELS_ARGS "${FUSED[@]}" \
      --time-limit-s "$lim" --out "$OUT/model_throughput.json" \
      --md "$WORK/model_throughput.md"
  fi
fi

# ---- summary (last): one markdown file with every report, then a short table
{
  for f in autotune_demo sweep model_throughput; do
    [ -f "$WORK/$f.md" ] && { cat "$WORK/$f.md"; echo; }
  done
} > "$OUT/summary.md"
SUMMARY=$("$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
lines = []
a = load("autotune_demo.json")
if a:
    rows = [r for r in a["rows"] if r.get("mode")]
    tuned = [(r.get("default") or {}, r.get(r["mode"]) or {}) for r in rows]
    faster = sum(1 for d, t in tuned if d.get("ms") and t.get("ms") and t["ms"] < d["ms"])
    changed = sum(1 for d, t in tuned if t.get("config") != d.get("config"))
    v = a.get("verdict") or {}
    lines.append(f"autotune: {len(rows)} problems tuned; tiles changed on {changed}, faster on "
                 f"{faster}; 2nd process: {v.get('why', '?')} -> "
                 + ("REUSED" if v.get("reused") else "NOT REUSED"))
s = load("sweep.json")
if s:
    st = s.get("status", {})
    wins = tot = 0
    by = {}
    for r in s["rows"]:
        ms = (r.get("fwd") or {}).get("ms")
        if ms:
            by.setdefault((r["problem"], r["dtype"]), {})[r["impl"]] = ms
    for d in by.values():
        if "fused" in d and "cudnn" in d:
            tot += 1
            wins += d["fused"] <= d["cudnn"]
    lines.append(f"sweep: {st.get('done')} of {st.get('planned')} problem runs in "
                 f"{st.get('elapsed_s')} s"
                 + (f"; fused <= cuDNN on {wins} of {tot}" if tot else "")
                 + (f"; stopped: {st['stopped']}" if st.get("stopped") else ""))
m = load("model_throughput.json")
if m:
    st = m["status"]
    lines.append(f"models: {st['done']} of {st['planned']} measurements in {st.get('elapsed_s')} s"
                 + (f"; stopped: {st['stopped']}" if st.get("stopped") else ""))
    rate = {}
    for r in m["rows"]:
        if r.get("images_per_s"):
            rate[(r["variant"], r["dtype"], r["mode"], r["backend"])] = r["images_per_s"]
    keys = sorted({k[:3] for k in rate}, key=lambda k: (m["variants"].index(k[0]), k[1], k[2]))
    for k in keys:
        cells = " ".join(f"{b} {rate[k + (b,)]:.0f}" for b in
                         ("fused", "gemm", "naive", "dense", "reference") if k + (b,) in rate)
        f, ref, den = (rate.get(k + (b,)) for b in ("fused", "reference", "dense"))
        sp = "".join([f"; fused/ref {f / ref:.2f}x" if f and ref else "",
                      f"; fused/dense {f / den:.2f}x" if f and den else ""])
        lines.append(f"  {k[0]:<11} {k[1]:<8} {k[2]:<5} img/s: {cells}{sp}")
print("\n".join(lines))
PYEOF
)
{
  echo
  echo "================ natten_jax benchmarks summary ================"
  for name in autotune sweep models; do
    has_step "$name" &&
      printf "%-9s %s (%s s)\n" "$name" "${STATUS[$name]:-not run}" "${SECONDS_TAKEN[$name]:-0}"
  done
  echo "$SUMMARY"
  echo "total $(( $(now) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
} | tee -a "$OUT/summary.md"
rm -rf "$WORK"
for name in autotune sweep models; do
  has_step "$name" && [ "${STATUS[$name]:-}" != ok ] && exit 1
done
exit 0
