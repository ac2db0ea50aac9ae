#!/usr/bin/env bash
# scripts/gpu_check.sh [OUT_DIR]
# On a GPU machine, in one call of a few minutes: the CUDA tests (every test marked `cuda`), then
# `scripts/benchmark.py --quick` when it is there, then a short table. The JUnit XML, the logs and the
# benchmark's output are kept in OUT_DIR (default: $OUT when set, else a fresh temporary folder).
# Exit status: 0 when every CUDA test passed (or skipped only for want of a second GPU) and the
# benchmark, if present, ran; 2 without a usable GPU; 1 otherwise.
#   PYTHON=/path/to/python scripts/gpu_check.sh      pick the interpreter (default: .venv/bin/python, else python3)
#   TEST_TIMEOUT=300 BENCH_TIMEOUT=240               the limits, in seconds, of the two parts
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${1:-${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}}"
mkdir -p "$OUT_DIR"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"

echo "== gpu_check: $(date -u +%FT%TZ), python $PYTHON, output in $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
if ! "$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; run this on a GPU machine with a CUDA build of torch")
names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {names}")
EOF
then
    exit 2
fi

# 1. The CUDA tests. A failure is reported in the table, not by stopping here.
tests_rc=0
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -m cuda -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/cuda_tests.xml" tests 2>&1 | tee "$OUT_DIR/cuda_tests.log" || tests_rc=$?

# 2. The benchmark, if this checkout has one.
bench_rc=0
bench_state="absent"
if [[ -f scripts/benchmark.py ]]; then
    bench_args=(--quick)
    if "$PYTHON" scripts/benchmark.py --help 2>/dev/null | grep -q -- "--json"; then
        bench_args+=(--json "$OUT_DIR/benchmark.json")
    fi
    timeout "$BENCH_TIMEOUT" "$PYTHON" scripts/benchmark.py "${bench_args[@]}" 2>&1 | tee "$OUT_DIR/benchmark.txt" \
        || bench_rc=$?
    if [[ $bench_rc -eq 0 ]]; then bench_state="ran"; elif [[ $bench_rc -eq 124 ]]; then bench_state="timed out"; else
        bench_state="failed (exit $bench_rc)"; fi
fi

# 3. The table.
"$PYTHON" - "$OUT_DIR" "$tests_rc" "$bench_state" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_state = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print("\n== gpu_check summary")
xml = out / "cuda_tests.xml"
if not xml.is_file():
    state = "timed out" if tests_rc == 124 else f"exit {tests_rc}"
    print(f"cuda tests: no report ({state}); see {out / 'cuda_tests.log'}")
else:
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
        name = case.get("name", "?")
        rows.append((f"{case.get('classname', '').split('.')[-1]}::{name}", outcome, float(case.get("time", 0))))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'test':<{width}}  {'outcome':<8}  seconds")
    for name, outcome, seconds in rows:
        print(f"{name:<{width}}  {outcome:<8}  {seconds:7.2f}")
    counts = {o: sum(r[1] == o for r in rows) for o in ("passed", "FAILED", "ERROR", "skipped")}
    total = sum(r[2] for r in rows)
    print(", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n) + f"  ({total:.1f} s)")
bench = out / "benchmark.txt"
print(f"benchmark: {bench_state}" + (f"; output in {bench}" if bench.is_file() else ""))
EOF

if [[ $tests_rc -ne 0 ]]; then
    echo "gpu_check: the CUDA tests did not all pass (exit $tests_rc)" >&2
    exit 1
fi
if [[ $bench_rc -ne 0 ]]; then
    echo "gpu_check: scripts/benchmark.py --quick $bench_state" >&2
    exit 1
fi
