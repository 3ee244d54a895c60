#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as one carry: ../shared/device/make-bundle.sh (Ray, MLflow, DeepSpeed,
# bitsandbytes) plus what ray-ft's GPU paths add to it: liger-kernel, for train.fused_linear_cross_entropy.
# Usage (from the project root): bash bench/gpu_bundle.sh   → .devbundle/site.tar.xz (must stay under 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_V=${LIGER_V:-0.8.5}
bash ../shared/device/make-bundle.sh
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 -m pip install -q --target "$W/site" --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "liger-kernel==$LIGER_V"
xz -d -k -c .devbundle/site.tar.xz > "$W/site.tar"
tar -rf "$W/site.tar" -C "$W/site" liger_kernel
xz -9 -T0 -c "$W/site.tar" > .devbundle/site.tar.xz.new
mv .devbundle/site.tar.xz.new .devbundle/site.tar.xz
size=$(stat -c %s .devbundle/site.tar.xz)
echo "gpu bundle: .devbundle/site.tar.xz $((size >> 20)) MiB (with liger-kernel $LIGER_V)"
[ "$size" -lt $((64 << 20)) ] || { echo "error: over the 64 MiB carry limit" >&2; exit 1; }
