#!/usr/bin/env bash
# The GPU check: one prepared script that runs rf_jax end to end on an accelerator machine and
# writes everything it saw into OUT_DIR.
#
#   bash scripts/device_wheels.sh              # where there is a network: the missing wheels
#   (copy the checkout, device_wheels/ included, to the GPU machine)
#   bash scripts/device_check.sh OUT_DIR       # there: sized for 8 minutes on one H200
#
# Steps (each one's output in OUT_DIR/logs/<step>.log, its exit status and seconds in
# OUT_DIR/steps.tsv):
#   install   the wheels of device_wheels/ whose distribution this Python lacks, offline, into
#             a directory put first on PYTHONPATH (pip install --no-index --find-links
#             device_wheels --no-deps --target ...), a matching protobuf only if the machine's
#             own cannot load tensorflow-metadata; then pip install -e . --no-deps (optional:
#             rf_jax runs from PYTHONPATH where that install is refused)
#   env       versions (rf-jax --version, every distribution), jax's devices, nvidia-smi, CPU;
#             stops the check when JAX's backend is not EXPECT_BACKEND
#   bench     python scripts/benchmark.py $BENCH_FLAGS --json OUT_DIR/benchmark.json (alone)
#   train_*   the demo config (synthetic chips, one shared dataset) for every model x dtype x
#             data.cache of MODELS x DTYPES x CACHES (or RUNS), PARALLEL processes at a time
#   evaluate_*  --mode evaluate of each of those workdirs in a new process: must say REPRODUCED
#   resume_*  the first run's config for RESUME_EPOCHS epochs, stopped by SIGTERM after its
#             first epoch (it must save and exit 0), rerun with the same command (it must
#             resume from the saved step and finish)
# then scripts/device_check_summary.py checks the outputs and writes OUT_DIR/summary.json and
# OUT_DIR/summary.md (img/s, wall times, REPRODUCED lines, versions, GPU). Exit status: 0 only
# when every step succeeded and every check passed.
#
# Env (defaults for the GPU; tests/test_device_check.py runs a reduced matrix on the CPU):
#   MODELS ("rgb rgbir dual")  DTYPES ("bfloat16 float32")  CACHES ("none device")
#   RUNS (MODEL_DTYPE_CACHE names run instead of that product, e.g. "rgb_bfloat16_none")
#   MODE (all: train, evaluate, report, submission; train)  EPOCHS (2)  CHIPS (1200)
#   TEST_CHIPS (100)  CHIP_SIZE (128)  CROP (112: crop and eval size)  WIDTH (64)  BATCH (16)
#   EVAL_BATCH (64)  EXTRA_FLAGS (more rf-jax flags for every run)  PARALLEL (4 runs at once;
#   their img/s are then not speeds: the benchmark's are)  EVALUATE (1)  RESUME (1)
#   RESUME_EPOCHS (12)  BENCH (1)  BENCH_FLAGS (see below)  BENCH_TIMEOUT_S (200)
#   DEADLINE_S (480: no step starts after it, and a running one is stopped at it)
#   EXPECT_BACKEND (gpu)  SKIP_INSTALL (0; 1 where everything is installed)  PYTHON (python3)
#   WHEELS_DIR (device_wheels)  WORK_DIR (a new temporary directory: workdirs, checkpoints,
#   installed wheels; removed at the end unless KEEP_WORK=1)
#   JAX_COMPILATION_CACHE_DIR (WORK_DIR/xla_cache: the evaluate and resume processes load the
#   programs the runs compiled, as `rf-jax` reruns do)
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

PYTHON=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-device_wheels}
SKIP_INSTALL=${SKIP_INSTALL:-0}
MODELS=${MODELS:-rgb rgbir dual}
DTYPES=${DTYPES:-bfloat16 float32}
CACHES=${CACHES:-none device}
RUNS=${RUNS:-}  # MODEL_DTYPE_CACHE names instead of the product, e.g. "rgb_bfloat16_none"
MODE=${MODE:-all}
EPOCHS=${EPOCHS:-2}
CHIPS=${CHIPS:-1200}
TEST_CHIPS=${TEST_CHIPS:-100}
CHIP_SIZE=${CHIP_SIZE:-128}
CROP=${CROP:-112}
WIDTH=${WIDTH:-64}
BATCH=${BATCH:-16}
EVAL_BATCH=${EVAL_BATCH:-64}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
PARALLEL=${PARALLEL:-4}
EVALUATE=${EVALUATE:-1}
RESUME=${RESUME:-1}
RESUME_EPOCHS=${RESUME_EPOCHS:-12}
BENCH=${BENCH:-1}
# 256 px, the study's batch 16 (eval 64), bf16, both frameworks, all three models, one round.
BENCH_FLAGS=${BENCH_FLAGS---dtype bfloat16 --rounds 1 --steps 50 --eval-steps 20 --warmup 3 \
--pipeline-seconds 2}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-200}
DEADLINE_S=${DEADLINE_S:-480}
EXPECT_BACKEND=${EXPECT_BACKEND:-gpu}
KEEP_WORK=${KEEP_WORK:-0}
if [[ -z "${WORK_DIR:-}" ]]; then
  WORK_DIR=$(mktemp -d)
else
  mkdir -p "$WORK_DIR"
  WORK_DIR=$(cd "$WORK_DIR" && pwd)
fi
if [[ "$KEEP_WORK" != 1 ]]; then
  trap 'rm -rf "$WORK_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK_DIR/xla_cache}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # the logs show each line when it is printed

T0=$(date +%s)
mkdir -p "$OUT/logs" "$OUT/env" "$OUT/runs"
: > "$OUT/steps.tsv"
for key in MODELS DTYPES CACHES RUNS MODE EPOCHS CHIPS TEST_CHIPS CHIP_SIZE CROP WIDTH BATCH \
           EVAL_BATCH EXTRA_FLAGS PARALLEL EVALUATE RESUME RESUME_EPOCHS BENCH BENCH_FLAGS \
           BENCH_TIMEOUT_S DEADLINE_S EXPECT_BACKEND SKIP_INSTALL PYTHON; do
  printf '%s=%s\n' "$key" "${!key}"
done > "$OUT/settings.env"

elapsed() { echo $(($(date +%s) - T0)); }
note() { echo "[$(elapsed) s] $*"; }

record() {  # record NAME KIND RC SECONDS WORKDIR
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"
  note "$1: exit $3 after $4 s"
}

run_step() {  # run_step NAME KIND WORKDIR LIMIT_S CMD...: never fails itself (see steps.tsv)
  local name=$1 kind=$2 workdir=$3 limit=$4 remaining start rc
  shift 4
  remaining=$((DEADLINE_S - $(elapsed)))
  if ((remaining <= 0)); then
    echo "not started: DEADLINE_S=${DEADLINE_S} passed" > "$OUT/logs/$name.log"
    record "$name" "$kind" deadline 0 "$workdir"
    return 0
  fi
  ((limit > 0 && limit < remaining)) && remaining=$limit
  start=$(date +%s)
  rc=0
  timeout --kill-after=20 "$remaining" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  record "$name" "$kind" "$rc" $(($(date +%s) - start)) "$workdir"
}

# A pool of PARALLEL background jobs (bash's wait -n).
running=0
pool() {
  "$@" &
  running=$((running + 1))
  if ((running >= PARALLEL)); then
    wait -n || true
    running=$((running - 1))
  fi
}
drain() {
  wait || true
  running=0
}

# --- install ------------------------------------------------------------------------------
if [[ "$SKIP_INSTALL" != 1 ]]; then
  note "install: wheels from $WHEELS_DIR"
  SITE="$WORK_DIR/site-packages"
  pip_install() {  # pip_install WHEEL...: into $SITE, offline, without dependencies
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then
      "$PYTHON" -m pip install --no-index --find-links "$WHEELS_DIR" --no-deps --upgrade \
        --target "$SITE" "$@"
    else  # a wheel is a zip of what goes into site-packages
      echo "no pip for $PYTHON: unpacking the wheels into $SITE"
      local wheel
      for wheel in "$@"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
    fi
  }
  install_wheels() {
    set -euo pipefail
    mkdir -p "$SITE"
    "$PYTHON" --version
    ls -l "$WHEELS_DIR"
    local missing
    mapfile -t missing < <("$PYTHON" scripts/device_check_summary.py --missing-wheels "$WHEELS_DIR")
    echo "installing the ${#missing[@]} wheels this Python lacks: ${missing[*]:-none}"
    if ((${#missing[@]})); then
      pip_install "${missing[@]}"
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
    local imports='import tensorflow_datasets, array_record, clu.metrics, ml_collections, tqdm
import tensorboardX, matplotlib.pyplot, tifffile, safetensors
from tensorflow_metadata.proto.v0 import schema_pb2
import rf_jax.main'
    if ! "$PYTHON" -c "$imports"; then
      echo "the imports fail: installing the carried protobuf and trying again"
      pip_install "$WHEELS_DIR"/protobuf-*.whl
      "$PYTHON" -c "$imports"
    fi
    echo "imports: ok"
  }
  export -f pip_install install_wheels
  export SITE WHEELS_DIR PYTHON
  run_step install install - 0 bash -c install_wheels
  if [[ "$(tail -n 1 "$OUT/steps.tsv" | cut -f3)" != 0 ]]; then
    note "install failed: see $OUT/logs/install.log"
    elapsed > "$OUT/elapsed_s"
    "$PYTHON" scripts/device_check_summary.py "$OUT" || true
    exit 1
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  # `rf-jax` and rf_jax's own version in provenance.json; optional: PYTHONPATH already has it.
  run_step install_editable optional - 0 \
    "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
fi

# --- env ----------------------------------------------------------------------------------
env_info() {
  echo "== date"; date -u +%Y-%m-%dT%H:%M:%SZ
  echo "== uname"; uname -a
  echo "== cpus"; nproc; (lscpu 2>/dev/null | grep -E '^(Model name|Socket|Core|Thread)') || true
  echo "== memory"; (free -g 2>/dev/null) || true
  echo "== git"; (git rev-parse HEAD && git status --short) 2>/dev/null || echo "not a git checkout"
  echo "== env"; env | grep -E '^(JAX_|XLA_|CUDA_|NVIDIA_|PYTHONPATH=)' | sort || true
}
env_info > "$OUT/env/machine.txt" 2>&1
(nvidia-smi > "$OUT/env/nvidia-smi.txt" 2>&1 \
  && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv \
       >> "$OUT/env/nvidia-smi.txt" 2>&1) \
  || echo "nvidia-smi: not available here" >> "$OUT/env/nvidia-smi.txt"
run_step version env - 120 "$PYTHON" -m rf_jax.main --version
run_step distributions env - 60 "$PYTHON" -c '
import importlib.metadata as md, sys
print(sys.version)
for name, version in sorted({(d.metadata["Name"], d.version) for d in md.distributions()}):
  print(f"{name}=={version}")'
run_step jax_devices env - 180 "$PYTHON" -c '
import jax
print("backend", jax.default_backend())
print("devices", jax.devices())
for d in jax.local_devices():
  print(d, d.memory_stats())
jax.print_environment_info()'
backend=$(sed -n 's/^backend //p' "$OUT/logs/jax_devices.log" | head -n 1)
if [[ "$backend" != "$EXPECT_BACKEND" ]]; then
  note "JAX's backend is '${backend:-none}', not EXPECT_BACKEND=$EXPECT_BACKEND: stopping" \
    "(logs/jax_devices.log)"
  echo "backend ${backend:-none} != EXPECT_BACKEND $EXPECT_BACKEND" > "$OUT/logs/backend.log"
  record backend env 1 0 -
  elapsed > "$OUT/elapsed_s"
  "$PYTHON" scripts/device_check_summary.py "$OUT" || true
  exit 1
fi

# --- benchmark (alone on the machine) -----------------------------------------------------
if [[ "$BENCH" == 1 ]]; then
  # shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
  run_step bench bench - "$BENCH_TIMEOUT_S" \
    "$PYTHON" scripts/benchmark.py $BENCH_FLAGS --json "$OUT/benchmark.json"
fi

# --- the matrix ---------------------------------------------------------------------------
if [[ "$EXPECT_BACKEND" == gpu && "$PARALLEL" -gt 1 \
      && -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  # each run preallocates its share of the GPU instead of 75% of it
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v p="$PARALLEL" 'BEGIN{printf "%.2f", 0.85 / p}')
  export XLA_PYTHON_CLIENT_MEM_FRACTION
fi
DATA="$WORK_DIR/data"
run_flags() {  # run_flags MODEL DTYPE CACHE EPOCHS: the rf-jax flags of a run, into FLAGS
  local extra
  read -r -a extra <<< "$EXTRA_FLAGS"
  FLAGS=(--config demo --config.model.name="$1" --config.dtype="$2" --config.data.cache="$3"
    --config.num_epochs="$4" --config.model.width="$WIDTH"
    --config.data.synthetic.num_chips="$CHIPS" --config.data.synthetic.num_test="$TEST_CHIPS"
    --config.data.synthetic.chip_size="$CHIP_SIZE" --config.data.crop_size="$CROP"
    --config.data.eval_size="$CROP" --config.batch_size="$BATCH"
    --config.eval_batch_size="$EVAL_BATCH" --config.data.raw_dir="$DATA/synthetic"
    --config.data.prepared_dir="$DATA/prepared" ${extra[@]+"${extra[@]}"})
}

names=()
if [[ -n "$RUNS" ]]; then
  read -r -a names <<< "$RUNS"
else
  for model in $MODELS; do
    for dtype in $DTYPES; do
      for cache in $CACHES; do
        names+=("${model}_${dtype}_${cache}")
      done
    done
  done
fi
note "matrix: ${#names[@]} runs (${names[*]}), $PARALLEL at a time"
first=1
for name in "${names[@]}"; do
  IFS=_ read -r model dtype cache <<< "$name"
  wd="$WORK_DIR/runs/$name"
  run_flags "$model" "$dtype" "$cache" "$EPOCHS"
  cmd=("$PYTHON" -m rf_jax.main --mode "$MODE" --workdir "$wd" "${FLAGS[@]}")
  if ((first)); then  # alone: it generates and prepares the shared dataset
    run_step "train_$name" train "$wd" 0 "${cmd[@]}"
    first=0
  else
    pool run_step "train_$name" train "$wd" 0 "${cmd[@]}"
  fi
done
drain

# --- evaluation in new processes, and the resume ------------------------------------------
resume_check() {
  # the first run's config (its compiled programs are in the cache) with more epochs
  local model dtype cache wd="$WORK_DIR/runs/resume" pid rc=0 start epochs
  IFS=_ read -r model dtype cache <<< "${names[0]}"
  run_flags "$model" "$dtype" "$cache" "$RESUME_EPOCHS"
  local cmd=("$PYTHON" -m rf_jax.main --mode train --workdir "$wd" "${FLAGS[@]}")
  start=$(date +%s)
  "${cmd[@]}" > "$OUT/logs/resume_sigterm.log" 2>&1 &
  pid=$!
  # SIGTERM once the first epoch is in history.json (the run then saves at that step or later)
  while kill -0 "$pid" 2>/dev/null; do
    epochs=$(grep -c '"epoch": ' "$wd/history.json" 2>/dev/null || true)
    if ((${epochs:-0} >= 1)); then
      kill -TERM "$pid"
      echo "device_check: sent SIGTERM after epoch ${epochs} was in history.json" \
        >> "$OUT/logs/resume_sigterm.log"
      break
    fi
    if (($(elapsed) >= DEADLINE_S)); then
      kill -KILL "$pid" || true
      break
    fi
    sleep 0.2
  done
  wait "$pid" || rc=$?
  record resume_sigterm resume "$rc" $(($(date +%s) - start)) "$wd"
  run_step resume_rerun resume "$wd" 0 "${cmd[@]}"
}

if [[ "$RESUME" == 1 ]]; then
  pool resume_check
fi
if [[ "$EVALUATE" == 1 ]]; then
  for name in "${names[@]}"; do
    wd="$WORK_DIR/runs/$name"
    if [[ -f "$wd/history.json" ]]; then
      pool run_step "evaluate_$name" evaluate "$wd" 0 \
        "$PYTHON" -m rf_jax.main --mode evaluate --workdir "$wd"
    else
      echo "not run: $wd has no history.json (its training failed)" > "$OUT/logs/evaluate_$name.log"
      record "evaluate_$name" evaluate skipped 0 "$wd"
    fi
  done
fi
drain

# --- the workdirs' small files, and the summary -------------------------------------------
for wd in "$WORK_DIR"/runs/*/; do
  [[ -d "$wd" ]] || continue
  dest="$OUT/runs/$(basename "$wd")"
  mkdir -p "$dest"
  for file in config.json history.json provenance.json log.txt parameters.txt eval/metrics.json \
              report/report.md; do
    if [[ -f "$wd/$file" ]]; then
      mkdir -p "$dest/$(dirname "$file")"
      cp "$wd/$file" "$dest/$file"
    fi
  done
done
elapsed > "$OUT/elapsed_s"
note "done in $(elapsed) s; summary:"
"$PYTHON" scripts/device_check_summary.py "$OUT"
