#!/usr/bin/env bash
# Every GPU figure in bench/RESULTS.md, in one command on a CUDA machine:
#   NANOCTL_HOME=<home with tokenizer + shards> OUT=<dir> bash bench/gpu_suite.sh [step ...]
# Steps (default: all): env tests d12 d20 engine ddp oom fp16 d12sdpa post evals. Each step is time-boxed; a failing step
# is logged and the suite goes on. Logs and a summary land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${*:-env tests d12 d20 engine ddp oom fp16 d12sdpa post evals}
COMMON=(--eval-every -1 --eval-tokens 524288 --sample-every -1 --save-every -1 --force)

summ() {  # median tok/s, MFU and peak memory of the steps after warm-up, from a run's metrics.jsonl
  "$PY" - "$NANOCTL_HOME/reports/$1/metrics.jsonl" "$1" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "tok_per_sec" in r][4:]
med = lambda k: statistics.median(r[k] for r in steps if r.get(k) is not None)
print(f"{sys.argv[2]}: {len(steps)} timed steps, median tok/s {med('tok_per_sec'):,.0f}, "
      f"median MFU {med('mfu'):.2f}%, median dt {med('dt') * 1000:.0f} ms")
PY
}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  grep -iE "peak memory|out of memory|error" "$OUT/$name.log" | tail -3 | tee -a "$OUT/summary.txt"
  return $rc
}

for step in $STEPS; do case $step in
env)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
  "$PY" -c "import torch, nanoctl.model.attention as a; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'flash', a.flash_kernel(), 'flex', a.flex_available())" 2>&1 | tee -a "$OUT/summary.txt" ;;
tests)
  run tests 240 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_model.py tests/test_optim.py tests/test_engine.py
  tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt" ;;
d12)  # nanochat's d12 at its own batch math: B=32, T=2048, 2^19 tokens/step (8 accumulation steps)
  run d12 300 "$PY" -m nanoctl pretrain --depth 12 --num-iterations 16 --model-tag d12 "${COMMON[@]}" && summ d12 ;;
d12sdpa)  # the same with SDPA (explicit window mask) instead of flex attention
  NANOCTL_ATTENTION=sdpa run d12sdpa 300 "$PY" -m nanoctl pretrain --depth 12 --num-iterations 16 --model-tag d12sdpa "${COMMON[@]}" && summ d12sdpa ;;
d20)
  run d20 420 "$PY" -m nanoctl pretrain --depth 20 --num-iterations 10 --device-batch-size 16 --total-batch-size 262144 --model-tag d20 "${COMMON[@]}" && summ d20 ;;
oom)  # must fail with the one-line "lower --device-batch-size" error, exit 1
  run oom 200 "$PY" -m nanoctl pretrain --depth 20 --num-iterations 2 --device-batch-size 512 --model-tag d20oom "${COMMON[@]}"
  tail -2 "$OUT/oom.log" | tee -a "$OUT/summary.txt" ;;
ddp)  # torchrun with one process: NCCL process group and the sharded optimizer path on one GPU
  run ddp 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m nanoctl pretrain --depth 12 --num-iterations 10 --model-tag d12ddp "${COMMON[@]}" && summ d12ddp ;;
engine)
  run engine 300 "$PY" bench/engine_bench.py --depth 20 --device cuda --dtype bfloat16 --repeats 3 --json
  grep -A4 "^batch" "$OUT/engine.log" | tee -a "$OUT/summary.txt" ;;
fp16)
  run fp16 300 "$PY" -m nanoctl pretrain --depth 12 --num-iterations 12 --dtype float16 --model-tag d12fp16 "${COMMON[@]}" && summ d12fp16
  grep -E "^step" "$OUT/fp16.log" | tail -2 | tee -a "$OUT/summary.txt" ;;
post)  # the chain on GPU: short d12 base -> mid (flex + compile) -> sft (dynamic compile) -> chat -p
  run post_base 300 "$PY" -m nanoctl pretrain --depth 12 --num-iterations 20 --total-batch-size 131072 --model-tag d12post "${COMMON[@]}" &&
  run post_mid 300 "$PY" -m nanoctl mid --model-tag d12post --num-iterations 10 --eval-every -1 &&
  run post_sft 300 "$PY" -m nanoctl sft --num-iterations 10 --eval-every -1 &&
  run post_chat 120 "$PY" -m nanoctl chat --stage sft -p "Who are you?" --json
  grep -E "^step|done" "$OUT"/post_*.log | tail -6 | tee -a "$OUT/summary.txt"
  tail -c 600 "$OUT/post_chat.log" | tee -a "$OUT/summary.txt" ;;
evals)  # CORE (bundle in the home) and a chat task on the GPU
  run eval_core 300 "$PY" -m nanoctl eval base --tag d12post --max-per-task 32 --no-download --no-progress
  tail -5 "$OUT/eval_core.log" | tee -a "$OUT/summary.txt"
  run eval_chat 200 "$PY" -m nanoctl eval chat --stage sft -t ARC-Easy -x 64 --no-progress
  tail -4 "$OUT/eval_chat.log" | tee -a "$OUT/summary.txt" ;;
*) echo "unknown step $step" ;;
esac; done
echo SUITE-DONE | tee -a "$OUT/summary.txt"
