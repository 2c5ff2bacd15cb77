#!/usr/bin/env bash
# Run pytest as PYTEST_SHARDS=n processes side by side (tests/conftest.py gives shard i every
# n-th test; GPU memory on demand), junit reports and logs under $OUT; prints each shard's
# failures, and last a line of counts: "<n> passed, <n> failed, <n> errors, <n> skipped".
# Exits with pytest's status (a shard that collected nothing, exit 5, is not a failure when
# there are several shards).
#
#   OUT=/tmp/out PY=python3 bash scripts/pytest_shards.sh -m gpu tests
#
# Runs in the current directory; the arguments go to pytest. Environment:
#   PY               interpreter (default python3)
#   OUT              where pytest[.i].xml and pytest[.i].log go (default /tmp/out)
#   PYTEST_SHARDS=n  n processes (default 1)
#   PYTEST_LIMIT_S   time limit of each shard (exit 124 when it runs out)
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
SHARDS=${PYTEST_SHARDS:-1}
mkdir -p "$OUT"
rm -f "$OUT"/pytest*.xml "$OUT"/pytest*.log
if ! [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "pytest_shards.sh: PYTEST_SHARDS must be a positive integer, got '$SHARDS'" >&2
  exit 2
fi

rc=0
if [ "$SHARDS" = 1 ]; then
  timeout "${PYTEST_LIMIT_S:-86400}" "$PY" -m pytest -q -rfE --junitxml="$OUT/pytest.xml" "$@" \
    > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -30 "$OUT/pytest.log"
else
  pids=()
  for ((i = 0; i < SHARDS; i++)); do
    NATTEN_JAX_TEST_SHARD="$i/$SHARDS" XLA_PYTHON_CLIENT_PREALLOCATE=false \
      timeout "${PYTEST_LIMIT_S:-86400}" "$PY" -m pytest -q -rfE \
      --junitxml="$OUT/pytest.$i.xml" "$@" > "$OUT/pytest.$i.log" 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < SHARDS; i++)); do
    wait "${pids[$i]}"
    rc_i=$?
    echo "-- shard $i/$SHARDS: pytest exit $rc_i"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.$i.log" | tail -15
    [ "$rc_i" != 0 ] && [ "$rc_i" != 5 ] && rc=$rc_i
  done
fi
"$PY" - "$OUT"/pytest*.xml <<'PYEOF'
import sys, xml.etree.ElementTree as ET
suites = []
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except Exception as e:  # no report: pytest did not get far
        print(f"no junit report {path} ({type(e).__name__})"); sys.exit()
    suites += [root] if root.tag == "testsuite" else list(root)
if not suites:
    print("no junit report"); sys.exit()
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
total, fail, err, skip = n("tests"), n("failures"), n("errors"), n("skipped")
print(f"{total - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped")
PYEOF
exit $rc
