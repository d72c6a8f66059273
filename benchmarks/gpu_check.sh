#!/usr/bin/env bash
# benchmarks/gpu_check.sh -- everything a session lent a GPU runs, in one call, from a clean
# checkout on a bare CUDA machine (H100 / H200; CUDA toolkit, torch, triton, pybind11 and ninja
# installed; no deepspeed, submitit or nibabel needed; no network):
#
#   bash benchmarks/gpu_check.sh OUTDIR          # about 5-8 minutes
#   bash benchmarks/gpu_check.sh --dry OUTDIR    # the same steps on CPU with tiny shapes (seconds)
#
# Steps, each with its own time limit, each recorded even when it fails:
#   1. build   kdhpc against the machine's own torch: pip install --no-deps --no-build-isolation -e .
#              with CUDA_HOME set (found from nvcc when unset) and TORCH_CUDA_ARCH_LIST=9.0
#              (Hopper; override by setting it); falls back to `setup.py build_ext --inplace`
#              where pip cannot install; then checks that kdhpc._C loads with CUDA.
#   2. tests   pytest -m gpu over the kernel tests (Triton softmax_kl and attention_map against
#              their references, values and gradients, fp32/bf16/fp16; the CUDA data-consistency
#              op against the CPU op and the reference), KDHPC_REQUIRE_EXT=1.
#   3. the kernel benchmarks softmax_kl, attention_map and data_consistency (interleaved CUDA-event
#              timing, fp32 and bf16, eager / torch.compile / kernel, goals met or missed).
#
# OUTDIR receives gpu_check.md (summary: device, versions, commit, each step's status and time,
# the goal lines), gpu_check.csv (one row per step), each benchmark's <topic>.csv and
# <topic>_<device>.md, and the logs. To publish a GPU run: copy OUTDIR/*_<device>.md into
# benchmarks/results/ and append each OUTDIR/<topic>.csv without its header line to
# benchmarks/results/<topic>.csv.
#
# --dry: no build (the extension must already be built, as in CI), CUDA hidden, Triton's
# interpreter, test collection only (the suite itself runs those tests), benchmarks with
# --smallest on CPU. tests/test_gpu_check.py runs it so that this script cannot rot between GPU
# sessions. The exit status is 0 only if every step passed.
set -uo pipefail

python=${PYTHON:-python}
build() {
  if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    elif [ -d /usr/local/cuda ]; then
      CUDA_HOME=/usr/local/cuda
    fi
  fi
  [ -n "${CUDA_HOME:-}" ] || { echo "no CUDA toolkit: set CUDA_HOME (nvcc not on PATH)"; return 1; }
  export CUDA_HOME TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$python" -m pip install --no-deps --no-build-isolation --no-index -e . \
    || echo "pip could not install kdhpc (see above)"
  # PYTHONPATH puts this checkout first, so kdhpc._C must sit in kdhpc/ here: build it in place
  # if the install left it elsewhere or failed.
  check_extension && return 0
  echo "building the extension in place (setup.py build_ext --inplace)"
  "$python" setup.py build_ext --inplace && check_extension
}

check_extension() {
  "$python" - <<'EOF'
import importlib, sys
import torch
dc = importlib.import_module("kdhpc.ops.data_consistency")
module = dc._extension()
if module is None:
    sys.exit(f"kdhpc._C does not load: {dc._Extension.error}")
print(f"kdhpc._C loads (torch {module.torch_version}, CUDA kernels: {module.with_cuda})")
if torch.cuda.is_available() and not module.with_cuda:
    sys.exit("kdhpc._C was built without CUDA on a CUDA machine (CUDA_HOME unset at build time?)")
EOF
}

kernel_tests=(tests/test_softmax_kl.py tests/test_attention_map.py tests/test_data_consistency.py)
gpu_tests() {
  "$python" -c "import pytest" 2>/dev/null \
    || { echo "pytest is not installed on this machine: no tests run"; return 1; }
  if [ "$dry" = 1 ]; then
    # Collection only: the suite runs these tests itself; here the marker must select them.
    "$python" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${kernel_tests[@]}" \
      | tee /dev/stderr | grep -qE "^[0-9]+/[0-9]+ tests collected"
  else
    KDHPC_REQUIRE_EXT=1 "$python" -m pytest -q -p no:cacheprovider -m gpu -rs \
      --junitxml="$out/gpu_tests.xml" "${kernel_tests[@]}"
  fi
}

# A step that is a function above runs as `bash gpu_check.sh --step FUNCTION` so that timeout
# can limit it; the environment (OUTDIR, --dry) comes from the parent through exported variables.
if [ "${1:-}" = "--step" ]; then
  out=$GPU_CHECK_OUT dry=$GPU_CHECK_DRY
  "$2"
  exit $?
fi

dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry] OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
self="$repo/benchmarks/gpu_check.sh"

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, whatever is installed
export KDHPC_RESULTS="$out"                           # benchmark rows and tables go to OUTDIR
export PYTHONDONTWRITEBYTECODE=1
export GPU_CHECK_OUT="$out" GPU_CHECK_DRY="$dry"
if [ "$dry" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  mode="dry run on CPU (tiny shapes; a check that the script runs, not a measurement)"
else
  mode="GPU run"
fi

summary="$out/gpu_check.md"
steps_csv="$out/gpu_check.csv"
failed=0
: > "$out/goals.txt"

environment() {
  "$python" - <<'EOF'
import torch
from kdhpc import bench
device = "cuda" if torch.cuda.is_available() else "cpu"
env = bench.environment(device)
print(",".join(f"{k}={env[k]}" for k in ("device", "torch", "cuda", "triton", "commit")))
EOF
}

env_line=$(environment 2>"$out/environment.log") || env_line="device=unknown (see environment.log)"
{
  echo "# gpu_check: $mode"
  echo
  echo "- started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "- ${env_line//,/; }"
  if command -v nvidia-smi >/dev/null && [ "$dry" = 0 ]; then
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$summary"
echo "step,status,seconds,mode,$(echo "$env_line" | sed 's/=[^,]*//g')" > "$steps_csv"
env_values=$(echo "$env_line" | sed 's/[^,=]*=//g')

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to OUTDIR/NAME.log and
# records the outcome in the summary and the CSV.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - start)) verdict=passed
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    verdict="timed out after ${limit}s"
  elif [ $status -ne 0 ]; then
    verdict="failed (exit $status)"
  fi
  [ "$verdict" = passed ] || failed=1
  echo "   $verdict in ${took}s (log: $name.log)"
  tail -n 5 "$out/$name.log" | sed 's/^/   | /'
  echo "| $name | $verdict | $took | $name.log |" >> "$summary"
  echo "$name,$verdict,$took,$([ "$dry" = 1 ] && echo dry || echo gpu),$env_values" >> "$steps_csv"
  grep -hE "\b(met|MISSED)\b" "$out/$name.log" | sed "s/^- //; s/^/$name: /" \
    >> "$out/goals.txt" || true
  return 0
}

if [ "$dry" = 1 ]; then
  step build 120 bash "$self" --step check_extension
  step tests 120 bash "$self" --step gpu_tests
  step softmax_kl 120 "$python" benchmarks/softmax_kl.py --smallest
  step attention_map 120 "$python" benchmarks/attention_map.py --smallest
  step data_consistency 120 "$python" benchmarks/data_consistency.py --smallest --device cpu \
    --threads 1 --case kdmri_8x1x320x320_real --case multicoil
else
  step build 200 bash "$self" --step build
  step tests 110 bash "$self" --step gpu_tests
  step softmax_kl 80 "$python" benchmarks/softmax_kl.py --case "seg 64x4x256x256" \
    --case "vocab 8192x32000" --repeats 30
  step attention_map 80 "$python" benchmarks/attention_map.py --case 16x32x320x320 --repeats 30
  step data_consistency 70 "$python" benchmarks/data_consistency.py --device cuda --rounds 30 \
    --case kdmri_8x1x320x320_real --case fastmri_4x1x256x256_complex --case multicoil
fi

{
  echo
  echo "## Goals"
  echo
  if [ -s "$out/goals.txt" ]; then sed 's/^/- /' "$out/goals.txt"; else echo "- (no goal lines)"; fi
  echo
  echo "Result tables: $(cd "$out" && ls ./*_*.md 2>/dev/null | grep -v gpu_check | tr '\n' ' ')"
  echo
  echo "finished $(date -u +%Y-%m-%dT%H:%M:%SZ); overall: $([ $failed = 0 ] && echo passed || echo FAILED)"
} >> "$summary"
rm -f "$out/goals.txt"
echo "summary: $summary"
exit $failed
