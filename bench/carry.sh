#!/usr/bin/env bash
# Prepare, on this machine, the folders the device runs carry (the device has no internet):
#   .whl        python-dotenv, gguf, peft, bitsandbytes, liger-kernel  (~45 MB: checks, 1b, 8bq, export)
#   .whl_small  the same without bitsandbytes and Liger                (~2 MB: bf16-only runs, profiles)
#   .mlxa       the first 60 MB of mlx-cuda-13 as tar.xz               (the call before `mlx`)
#   .mlxb       the rest of it, with the mlx and mlx-lm wheels          (the `mlx` call)
#   .unsloth    Unsloth 2026.10.9 and what it needs beyond the device's torch/transformers (~10 MB;
#               the unsloth wheel without its 86 MB `studio/` web app, which training never imports)
# The device's Python is 3.12 on x86-64; versions are the pins of constraints.txt. Each call may carry
# 64 MiB, so mlx-cuda (90 MB as a wheel, 76 MB as tar.xz) travels in two calls on one warm machine.
# Usage: bash bench/carry.sh   (NO_MLX=1 skips the mlx folders; then name the folders in the device call's `carry`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pin() { grep -i "^$1==" constraints.txt | head -1; }
dl=.dl
mkdir -p "$dl"
get() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dl" "$@"
}
get "$(pin python-dotenv)" "$(pin gguf)" "$(pin peft)" "$(pin bitsandbytes)" "$(pin liger-kernel)"
[ -n "${NO_MLX:-}" ] || get "$(pin mlx)" "$(pin mlx-lm)" "mlx-cuda-13==$(pin mlx | cut -d= -f3)"
# Unsloth 2026.10.9 pins transformers <= 5.17 (the device's), datasets < 5, trl <= 1.15.
get unsloth==2026.10.9 unsloth_zoo==2026.10.9 "trl==1.15.0" "datasets==4.8.5" "$(pin dill)" "$(pin multiprocess)" \
    cut_cross_entropy==25.1.1 torchao==0.18.0 tyro==1.0.17 msgspec==0.23.0 json5==0.17.3 structlog==26.1.0
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in .whl .whl_small .mlxa .mlxb .unsloth "$dl"; do
  grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"
done
rm -rf .whl .whl_small .mlxa .mlxb .unsloth
mkdir -p .whl .whl_small .mlxa .mlxb .unsloth
cp "$dl"/python_dotenv-*.whl "$dl"/gguf-*.whl "$dl"/peft-*.whl .whl_small/
cp .whl_small/*.whl "$dl"/bitsandbytes-*.whl "$dl"/liger_kernel-*.whl .whl/
for w in unsloth-2026.10.9 unsloth_zoo-2026.10.9 trl- datasets-4 dill- multiprocess- cut_cross_entropy- torchao- \
         tyro- msgspec- json5- structlog-; do cp "$dl"/$w*.whl .unsloth/; done
zip -q -d .unsloth/unsloth-2026.10.9-py3-none-any.whl 'studio/*'  # pip installs a wheel without checking RECORD
if [ -n "${NO_MLX:-}" ]; then du -sh .whl .whl_small .unsloth; exit 0; fi
cp "$dl"/mlx-[0-9]*.whl "$dl"/mlx_lm-*.whl .mlxb/
# mlx-cuda's files, unpacked over the mlx wheel on the device (bench/device.sh joins the halves)
wheel=$(realpath "$dl"/mlx_cuda_13-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$tmp.tar.xz"' EXIT
(cd "$tmp" && unzip -q "$wheel" && tar cf - . | xz -T0 -6) > "$tmp.tar.xz"
head -c 60000000 "$tmp.tar.xz" > .mlxa/mlxc.tar.xz.00
tail -c +60000001 "$tmp.tar.xz" > .mlxb/mlxc.tar.xz.rest
du -sh .whl .whl_small .mlxa .mlxb .unsloth
