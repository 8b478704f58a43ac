#!/usr/bin/env bash
# Driver for the device machine (the `device` tool runs it in the repo root): install the
# carried wheels, then run stages in order, logging under $OUT. Usage: bash bench/device.sh STAGE...
# The carried folders (.whl, .whl_small, .mlxa, .mlxb, .unsloth) are made here by `bash bench/carry.sh`.
#   checks  varlen attention and Liger against SDPA on a small model (losses, gradients, isolation)
#   1b      1B bf16 + 1B QLoRA suites (carry .whl .whl_small; .mlxa too, to leave it for the mlx call)
#   proof   `llm-ft train` bf16 LoRA and QLoRA runs of the 1B model (carry .benchtok)
#   mlx     MLX-CUDA vs mlx_lm.lora (+ torch) (carry .mlxb; the call right after one that carried .mlxa)
#   mem     8B bf16 and QLoRA: ours in memory modes default, checkpoint, offload; Unsloth GC off and
#           offloaded; the seeds' recipe GC on and off (carry .whl .unsloth). memb, memq: one suite each.
#           MEM_ARGS adds arguments (e.g. "--only ours --only unsloth"), STEPS sets the steps (8)
#   8b, 8bq 8B bf16, 8B QLoRA suites;  longest: 8B QLoRA longest batch-1 sequence, ours vs B0
#   losschunk  the chunked loss's time and peak for several chunk sizes (8B head, 2048 positions)
#   profile torch.profiler over 1B uniform-length steps (PROFILE_ARGS, e.g. "--kernels off --flat-multiple 1")
#   export  merge + GGUF of the 1B-size run vs cp on the device's 16 cores and disk (carry .whl .benchtok)
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site "$OUT"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
for d in .whl .whl_small; do
  if compgen -G "$d/*.whl" >/dev/null; then install "$d"/*.whl || exit 1; fi
done
if compgen -G ".unsloth/*.whl" >/dev/null; then  # apart: only the Unsloth sides put it on their path
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-unsloth \
    .unsloth/*.whl || exit 1
fi
if compgen -G ".mlxa/*" >/dev/null; then cp .mlxa/* /root/; fi  # first half of mlx-cuda, for the next call
if [ -f .mlxb/mlxc.tar.xz.rest ]; then
  [ -f /root/mlxc.tar.xz.00 ] || { echo "mlx-cuda first half missing: the machine went cold between calls"; exit 3; }
  install .mlxb/*.whl || exit 1  # first: pip --target --upgrade replaces the whole mlx/ folder
  cat /root/mlxc.tar.xz.00 .mlxb/mlxc.tar.xz.rest | xz -dc | tar xf - -C /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
for stage in "$@"; do
log="$OUT/log_$stage.txt"
echo "=== $stage $(date +%T)"
case $stage in
  checks) python3 -m bench.gpu_checks 2>&1 | tee "$log" ;;
  1b) python3 -m bench.gpu_torch --suite 1b-bf16 --suite 1b-qlora --out "$OUT" 2>&1 | tee "$log" ;;
  proof) python3 -m bench.gpu_proof --tokenizer .benchtok --out "$OUT" 2>&1 | tee "$log" ;;
  mlx)
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee "$log"
    python3 -m bench.gpu_mlx --out "$OUT" ${MLX_ARGS:-} 2>&1 | tee -a "$log" ;;
  losschunk) python3 -m bench.gpu_loss_chunk 2>&1 | tee "$log" ;;
  profile) python3 -m bench.gpu_profile ${PROFILE_ARGS:-} 2>&1 | tee "$log" ;;
  8b) python3 -m bench.gpu_torch --suite 8b-bf16 --steps 12 --warmup 2 --out "$OUT" 2>&1 | tee "$log" ;;
  1bx) python3 -m bench.gpu_torch --suite 1b-diag --out "$OUT" 2>&1 | tee "$log" ;;
  mem) python3 -m bench.gpu_torch --suite 8b-memory --suite 8b-qlora-memory --steps ${STEPS:-8} --warmup 2 ${MEM_ARGS:-} --out "$OUT" 2>&1 | tee "$log" ;;
  memb) python3 -m bench.gpu_torch --suite 8b-memory --steps ${STEPS:-8} --warmup 2 ${MEM_ARGS:-} --out "$OUT" 2>&1 | tee "$log" ;;
  memq) python3 -m bench.gpu_torch --suite 8b-qlora-memory --steps ${STEPS:-8} --warmup 2 ${MEM_ARGS:-} --out "$OUT" 2>&1 | tee "$log" ;;
  8bq) python3 -m bench.gpu_torch --suite 8b-qlora --steps 10 --warmup 2 --out "$OUT" 2>&1 | tee "$log" ;;
  export) python3 -m bench.export_bench --tokenizer .benchtok --workdir /tmp/bench-export --out "$OUT" 2>&1 | tee "$log" ;;
  longest) python3 -m bench.gpu_longest --model llama-3.1-8b --lengths 16384,32768,65536,131072 --out "$OUT" 2>&1 | tee "$log" ;;
  *) echo "unknown stage $stage" ;;
esac
done
