#!/usr/bin/env bash
# The GPU benchmark run of issue 14, in the order the issue asks for: the
# 1B-parameter selection (bench_select), the train-step overhead
# (bench_step), then compaction (bench_compact) and dynamic sparse training
# (bench_dynamic) while time is left. Every piece has its own time limit, so
# a slow one cannot starve the first ones; logs and JSON go to $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh          # on the GPU machine
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_run.sh  # a CPU smoke run
set -u
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "${QUICK:-}" ]; then
  SEL="--sizes 1M --reps 2"; STEP="--reps 1"; COMPACT="--quick"; DYN="--reps 1"
  T1=300; T2=300; T3=300; T4=300
else
  SEL="--sizes 16M,256M,1G --reps 9 --skip-argsort-above 256M --breakdown"
  STEP="--reps 20 --breakdown"; COMPACT="--batch 256 --reps 11 --skip pruning,conv,trace"
  DYN="--reps 3"
  T1=170; T2=110; T3=150; T4=60
fi
LOGS=$(mktemp -d)  # at most 8 files come back from the GPU machine: logs are joined
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/summary.txt" 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >>"$OUT/summary.txt" 2>&1
run() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
run select "$T1" python benchmarks/bench_select.py $SEL --json "$OUT/select.json"
run step "$T2" python benchmarks/bench_step.py $STEP --json "$OUT/step.json"
run compact "$T3" python benchmarks/bench_compact.py $COMPACT --json "$OUT/compact.json"
run dynamic "$T4" python benchmarks/bench_dynamic.py $DYN --json "$OUT/dynamic.json"
for f in select step compact dynamic; do
  [ -f "$LOGS/$f.log" ] && { echo "===== $f"; cat "$LOGS/$f.log"; } >>"$OUT/logs.txt"
done
cat "$OUT/summary.txt"
