#!/usr/bin/env bash
# One-shot GPU check of ppml_fast on a lent CUDA machine (the device tool's `run`), in the repo
# root of a fresh copy of the working tree. Whatever it writes under $OUT comes back:
#   device_check.log          everything this script prints (versions, build, steps, statuses)
#   tests_cpu_clip.log        pytest of the CPU clipping kernel's builds (the crash of machine B)
#   tests.log                 pytest of the CUDA tests (ops and the DP engine)
#   bench_dp_step_cuda.json   `ppml-fast bench --only dp-step --device cuda --json` (M1, M2, M3)
#   dp_step_memory_cuda.json  peak CUDA memory of one DP step per impl (allocator statistics)
#   bench_ops_cuda.json       the op cases on the GPU (no torch.compile)
#   bench_clip_compile_cuda.json  clip B=256 P=1M with the torch.compile baseline (last: slowest)
#   summary.txt               the step statuses and the tables of the JSON files
# Steps (each under its own `timeout`, all together under PPML_CHECK_BUDGET seconds, default
# 400; a step that fails or times out is reported and the next one runs):
#   a. machine, driver, compiler and Python package versions
#   e. carried wheels: .whl/*.whl (Opacus 1.6.0, for the baselines) into /tmp/site
#   b. the extension with the CUDA kernels for sm_90 only (build/gpu), copied into python/ppml_fast
#   c. the CPU clipping tests, then every test marked cuda (tests/ops/test_cuda.py,
#      tests/privacy/test_cuda_engine.py, ...)
#   d. the DP-step and op benchmarks on the GPU
# Exit status: 0 when every step that ran succeeded, else 1.
# Environment: PYTHON (default python3), OUT (default ./device-out), PPML_CHECK_BUILD=0 skips the
# build (use the extension already in python/ppml_fast), PPML_CHECK_BUDGET (seconds),
# PPML_CHECK_STEPS (default "a e b c d": which steps run, in that order).
#   bash -n bench/device_check.sh; OUT=/tmp/out PPML_CHECK_BUILD=0 bash bench/device_check.sh
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
BUDGET=${PPML_CHECK_BUDGET:-400}
STEPS=${PPML_CHECK_STEPS:-a e b c d}
DEADLINE=$((SECONDS + BUDGET))
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/python"
exec > >(tee -a "$OUT/device_check.log") 2>&1
TEE=$!

STATUS=()

# limit SECONDS: the step's own limit, cut to what is left of the budget (minus 5 s to wrap up)
limit() {
  local left=$((DEADLINE - SECONDS - 5))
  ((left < 1)) && left=1
  ((left < $1)) && echo "$left" || echo "$1"
}

# step NAME MAX_SECONDS CMD...: run CMD under its timeout, record its status
step() {
  local name=$1 max=$2
  shift 2
  local t
  t=$(limit "$max")
  echo
  echo "=== [$((SECONDS))s] $name (timeout ${t}s)"
  local start=$SECONDS
  timeout -k 10 "$t" bash -c '"$@"' step "$@"  # a fresh bash: the functions are exported
  local rc=$?
  local what=ok
  ((rc == 124 || rc == 137)) && what="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED"
  STATUS+=("$name: $what (rc $rc, $((SECONDS - start)) s)")
  echo "=== $name: $what (rc $rc, $((SECONDS - start)) s)"
  return $rc
}

has() { [[ " $STEPS " == *" $1 "* ]]; }

info() {
  uname -a
  nvidia-smi || echo "nvidia-smi: not available"
  nvcc --version | tail -n 2 || echo "nvcc: not available"
  cmake --version | head -n 1
  ninja --version || echo "ninja: not available"
  "$PY" - <<'EOF'
import os, platform, sys, sysconfig
print("python", platform.python_version(), sys.executable)
inc = sysconfig.get_paths()["include"]
print("Python.h", inc, "present" if os.path.exists(os.path.join(inc, "Python.h")) else "MISSING")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
for name in ("numpy", "scipy", "pybind11", "pytest", "opt_einsum", "opacus"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError as e:
        print(name, "not importable:", e)
EOF
}

wheels() {
  if ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "no .whl folder: Opacus baselines will be error rows"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl || return 1
  export PYTHONPATH="$ROOT/python:/tmp/site"
  "$PY" -c "import opacus; print('opacus', opacus.__version__, opacus.__file__)"
}

configure() {
  cmake -S . -B build/gpu -G Ninja -DPPML_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")"
}

install_so() {
  local so
  so=$(ls build/gpu/_C*.so 2>/dev/null | head -n 1)
  [[ -n $so ]] || { echo "no build/gpu/_C*.so"; return 1; }
  rm -f python/ppml_fast/_C*.so  # an extension of another Python left in the tree
  cp "$so" python/ppml_fast/ && echo "installed $so"
}

check_import() {
  "$PY" -c "
import torch, ppml_fast
from ppml_fast.ops import cuda_available
print('ppml_fast', ppml_fast.__file__, '| CUDA kernels:', cuda_available(),
      '| torch sees a GPU:', torch.cuda.is_available())
"
}

# every test marked cuda (tests/ops/test_cuda.py, tests/privacy/test_cuda_engine.py, ...); no -x:
# one run must bring back every failure
cuda_tests() {
  local files cpu_rc
  # first the CPU clipping kernel on this host's CPU and compiler (it crashed on an AVX-512 /
  # g++ 13 host before its target_clones dispatch was removed): both builds, bit for bit
  "$PY" -m pytest tests/ops/test_clip_simd.py tests/ops/test_clip_and_accumulate.py -q -rfEs \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests_cpu_clip.log"
  cpu_rc=${PIPESTATUS[0]}
  mapfile -t files < <(grep -rl --include='test_*.py' 'mark\.cuda' tests | sort)
  echo "files: ${files[*]}"
  # each step runs in a fresh bash, where the parent's pipefail does not hold: take pytest's
  # own status, so that a crash (a signal) or a failure marks the step FAILED
  "$PY" -m pytest "${files[@]}" -m cuda -q -rfEs --durations=15 -p no:cacheprovider \
    ${PPML_CHECK_PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
  local rc=${PIPESTATUS[0]}
  ((rc == 0)) && rc=$cpu_rc
  return "$rc"
}

# bench FILE ARGS...: `ppml-fast bench ARGS --json` into $OUT/FILE (stderr into the log)
bench() {
  local file=$1
  shift
  "$PY" -m ppml_fast bench "$@" --json >"$OUT/$file.part" && mv "$OUT/$file.part" "$OUT/$file"
}

memory() {
  "$PY" -m ppml_fast.benchmarks.dp_step --memory --device cuda --json \
    >"$OUT/dp_step_memory_cuda.json.part" \
    && mv "$OUT/dp_step_memory_cuda.json.part" "$OUT/dp_step_memory_cuda.json"
}

summary() {
  {
    echo "device_check statuses (budget ${BUDGET}s, used $((SECONDS))s):"
    printf '  %s\n' "${STATUS[@]}"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$OUT/tests.log" 2>/dev/null \
      | tail -n 40
    "$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
from ppml_fast.benchmarks.report import format_table
from ppml_fast.benchmarks.dp_step import format_peak_memory
out = pathlib.Path(sys.argv[1])
for name in ("bench_dp_step_cuda.json", "bench_ops_cuda.json", "bench_clip_compile_cuda.json"):
    p = out / name
    if p.exists():
        doc = json.loads(p.read_text())
        print(f"\n--- {name}")
        print(format_table(doc["results"], doc["meta"]))
p = out / "dp_step_memory_cuda.json"
if p.exists():
    doc = json.loads(p.read_text())
    print(f"\n--- {p.name} ({doc['meta']})")
    print(format_peak_memory(doc["results"]))
EOF
  } >"$OUT/summary.txt" 2>&1
  rm -f "$OUT"/*.part
  cat "$OUT/summary.txt"
}

export ROOT PY OUT
export -f info wheels configure install_so check_import cuda_tests bench memory

echo "device_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $ROOT, OUT=$OUT"
echo "steps: $STEPS, budget ${BUDGET}s"
has a && step "a: versions" 60 info
has e && { step "e: wheels" 60 wheels || true; }
if has e && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1 && [[ -d /tmp/site ]]; then
  export PYTHONPATH="$ROOT/python:/tmp/site"  # step ran in a subshell of timeout: set it here
fi
if has b; then
  if [[ ${PPML_CHECK_BUILD:-1} == 0 ]]; then
    echo "=== b: build skipped (PPML_CHECK_BUILD=0)"
    STATUS+=("b: build skipped")
  else
    step "b1: configure (CUDA ON, sm_90)" 120 configure \
      && step "b2: build" 300 cmake --build build/gpu -j "$(nproc)" \
      && step "b3: install _C" 10 install_so
  fi
  step "b4: import" 60 check_import
fi
has c && step "c: CUDA tests" 240 cuda_tests
if has d; then
  step "d1: DP-step bench (cuda)" 180 bench bench_dp_step_cuda.json --only dp-step --device cuda
  step "d2: DP-step peak memory (cuda)" 90 memory
  step "d3: op bench (cuda)" 150 bench bench_ops_cuda.json --only clip noise aggregate \
    --device cuda --compile none
  step "d4: clip with torch.compile (cuda)" 150 bench bench_clip_compile_cuda.json \
    --only clip-256x1M --device cuda --compile all
fi
summary
bad=0
for st in "${STATUS[@]}"; do [[ $st == *": ok "* || $st == *"skipped"* ]] || bad=1; done
exec >&- 2>&-  # let tee see the end of the output and finish the log
wait "$TEE" 2>/dev/null
exit $bad  # 1 when a step failed or timed out (see summary.txt)
