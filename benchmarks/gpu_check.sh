#!/usr/bin/env bash
# The GPU half of issue 27's proof: what a session lent a GPU runs as it is, in one call, in under
# 8 minutes on one GPU. It installs tinycifar over the machine's own PyTorch (pip --no-deps, no
# network; airbench from a wheel carried in .whl/), runs the CUDA tests (pytest -m cuda), then times
# whole commands from spawn to exit: the fast, seed (3 epochs) and best (2 epochs) presets, each with
# --precision auto and fp16, airbench94 on the same GPU, and fast with --compile. It writes
# benchmarks/results/gpu_<gpu-name>.md (and .json) and copies them, with the logs, under $OUT when
# $OUT is set. docs/gpu.md gives the device call that runs it.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--data DIR] [--results DIR] [--budget SECONDS]
#   --dry-run   no GPU needed: the environment checks, the CUDA tests (they skip), one timed 1-epoch CPU
#               command on 200 synthetic images and the results file from it; lists what it would time
#   --data DIR  a folder holding cifar-10-batches-py (real CIFAR-10); default: a synthetic dataset of
#               CIFAR-10's sizes (CIFAR-10 cannot travel to the lent machine: accuracy is not measured)
#   --results DIR  where gpu_<name>.md goes (default benchmarks/results; a dry run's: a temporary folder)
#   --budget SECONDS  the whole script's time limit (default 450): each command's timeout is cut to
#               what is left of it, and none starts with less than 30 s left (its row says so)
# Environment: PYTHON (default python3), OUT (a folder the device tool brings back).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY_RUN=0 DATA="" RESULTS="" BUDGET=450
START=$(date +%s.%N)

bad() { echo "gpu_check.sh: $*" >&2; exit 2; }
elapsed() { awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", b - a }'; }
# seconds a command may still take: the budget less what is spent and 15 s for the report, at most $1
allowance() { local left=$((BUDGET - $(elapsed) - 15)); echo $((left < $1 ? left : $1)); }

while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --data) [[ -d ${2:-}/cifar-10-batches-py ]] || bad "--data ${2:-}: expected a folder holding cifar-10-batches-py/"
            DATA=$2; shift ;;
    --results) [[ -n ${2:-} ]] || bad "--results: expected a folder"; RESULTS=$2; shift ;;
    --budget) [[ ${2:-} =~ ^[0-9]+$ ]] || bad "--budget: expected whole seconds, got '${2:-}'"; BUDGET=$2; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) bad "unknown option '$1'; expected --dry-run, --data DIR, --results DIR or --budget SECONDS" ;;
  esac
  shift
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
# a dry run's table shows only that the script works: it stays out of the repository unless asked for
RESULTS=${RESULTS:-$( ((DRY_RUN)) && echo "$WORK/results" || echo benchmarks/results)}
mkdir -p "$RESULTS" || bad "--results $RESULTS: cannot create it"
TIMINGS=$WORK/timings.tsv
printf 'kind\tcommand\tprecision\twall_s\trc\tplace\n' >"$TIMINGS"

echo "== install"
if ((DRY_RUN)); then
  echo "would run: $PYTHON -m pip install -q --no-index --no-deps .whl/*.whl   (airbench, carried with the call)"
  echo "would run: $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation .   (over the machine's torch)"
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl \
      || echo "the wheels in .whl/ did not install: airbench's row will say it did not run"
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . || {
    echo "pip could not install tinycifar here: using src/ on PYTHONPATH instead"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  }
fi

echo "== environment"
ENVIRONMENT=$("$PYTHON" benchmarks/gpu_check.py env)
echo "$ENVIRONMENT"
if ((!DRY_RUN)) && grep -q '^cuda: no CUDA' <<<"$ENVIRONMENT"; then
  bad "no CUDA device is seen by torch; without a GPU run it with --dry-run"
fi
MISSING=$(grep -E '^(tinycifar|tqdm|matplotlib|numpy|PIL): missing' <<<"$ENVIRONMENT" | cut -d: -f1 | tr '\n' ' ' || true)
[[ -z $MISSING ]] || bad "these do not import, so tinycifar cannot run: $MISSING"
if grep -q '^airbench: missing' <<<"$ENVIRONMENT"; then HAS_AIRBENCH=0; else HAS_AIRBENCH=1; fi

echo "== CUDA tests"
LIMIT=$(allowance 240)
if ((LIMIT < 30)); then
  echo "not run: the time budget is spent" >"$WORK/pytest.log"
else
  timeout "$LIMIT" "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_cuda_device_use.py 2>&1 \
    | tee "$WORK/pytest.log" || true
fi
TESTS_LINE=$(tail -n 1 "$WORK/pytest.log")

# timed KIND LABEL PRECISION PLACE LOG -- ARGV...: run ARGV from spawn to exit, output to LOG; one row of
# the timings file (PLACE: the run folder, or airbench's log folder, that the report reads)
timed() {
  local kind=$1 label=$2 precision=$3 place=$4 log=$5 limit rc=0 t0 t1
  shift 6
  limit=$(allowance 180)
  if ((limit < 30)); then
    echo "-- not started (time budget spent): $label"
    printf '%s\t%s\t%s\t0\t-1\t%s\n' "$kind" "$label" "$precision" "$place" >>"$TIMINGS"
    return
  fi
  echo "-- $label ($precision), limit ${limit}s"
  t0=$(date +%s.%N)
  timeout "$limit" "$@" >"$log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  grep -E '^(Done|run folder)' "$log" || true
  ((rc == 0)) || tail -n 5 "$log"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$label" "$precision" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" "$rc" "$place" >>"$TIMINGS"
}

RUNS=$WORK/runs
mkdir -p "$RUNS"
TRAIN=("$PYTHON" -m tinycifar train)
GPU_RUNS=(
  "fast|auto|--preset fast --precision auto"
  "fast|fp16|--preset fast --precision fp16"
  "seed|auto|--preset seed --epochs 3 --precision auto"
  "seed|fp16|--preset seed --epochs 3 --precision fp16"
  "best|auto|--preset best --epochs 2 --precision auto"
  "best|fp16|--preset best --epochs 2 --precision fp16"
)
COMPILED_RUN="fast-compile|auto|--preset fast --precision auto --compile"

# time_train "NAME|PRECISION|OPTIONS": one tinycifar train command on the data chosen below
time_train() {
  local name precision options
  IFS='|' read -r name precision options <<<"$1"
  # shellcheck disable=SC2086  # $options holds several options
  timed tinycifar "tinycifar train $options" "$precision" "$RUNS/$name-$precision" "$RUNS/$name-$precision.log" -- \
    "${TRAIN[@]}" $options "${DATA_ARGS[@]}" --out "$RUNS/$name-$precision"
}

time_airbench() {
  local label="airbench94 (benchmarks/airbench_gpu.py)"
  if ((!HAS_AIRBENCH)); then
    label="airbench94: not run, airbench is not installed (carry its wheel in .whl/)"
    printf 'airbench\t%s\tfp16\t0\t-1\t%s\n' "$label" "$RUNS/airbench" >>"$TIMINGS"
    return
  fi
  mkdir -p "$RUNS/airbench"
  timed airbench "$label" fp16 "$RUNS/airbench" "$RUNS/airbench/output.log" -- \
    "$PYTHON" benchmarks/airbench_gpu.py --data "$DATA" "${AIRBENCH_ARGS[@]}" --log "$RUNS/airbench/evaluations.jsonl"
}

echo "== timed commands"
if ((DRY_RUN)); then
  NOTE="200 synthetic images, 1 epoch on the CPU (a dry run: its numbers only show that the table is written)"
  DATA_ARGS=(--device cpu --precision fp32 --threads 1 --dataset synthetic --set synthetic_size=200 --batch-size 50)
  time_train "dry|fp32|--preset fast --epochs 1"
  for spec in "${GPU_RUNS[@]}" "$COMPILED_RUN"; do
    echo "would time: tinycifar train ${spec##*|} --data DATA --no-download"
  done
  echo "would time: $PYTHON benchmarks/airbench_gpu.py --data DATA --log LOG   (airbench94 as published, fp16)"
else
  if [[ -n $DATA ]]; then
    DATA_ARGS=(--data "$DATA" --no-download) AIRBENCH_ARGS=()
    NOTE="CIFAR-10 from $DATA"
  else
    DATA=$WORK/data DATA_ARGS=(--data "$WORK/data" --allow-modified --no-download) AIRBENCH_ARGS=(--allow-modified)
    NOTE="synthetic, of CIFAR-10's sizes (50,000 training and 10,000 test images of 32x32, written by
\`benchmarks/gpu_check.py data\` and read by tinycifar's CIFAR-10 loader): CIFAR-10 itself cannot travel to the lent
machine, so the timings are CIFAR-10's but **the accuracies are not CIFAR-10 accuracies**"
    "$PYTHON" benchmarks/gpu_check.py data "$DATA"
  fi
  for spec in "${GPU_RUNS[@]}"; do time_train "$spec"; done
  time_airbench  # before --compile: the comparison matters more if the budget runs short
  time_train "$COMPILED_RUN"
fi

echo "== results"
"$PYTHON" benchmarks/gpu_check.py report --timings "$TIMINGS" --results "$RESULTS" --data-note "$NOTE" \
  --tests "$TESTS_LINE" | tee "$WORK/report.txt"
RESULT=$(tail -n 1 "$WORK/report.txt" | sed 's/^results: //')
if [[ -n ${OUT:-} ]]; then
  cp "$RESULT" "${RESULT%.md}.json" "$TIMINGS" "$WORK/pytest.log" "$OUT/"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.pt' runs
fi
echo "gpu_check.sh: done in $(elapsed) s; results: $RESULT"
