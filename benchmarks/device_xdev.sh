#!/usr/bin/env bash
# One device run of the portable-bitstream check (benchmarks/cross_device.py), prepared so a
# lent GPU's minutes go to the check itself. Here, first:
#   ../shared/tools/device_wheels.sh                      # wheels into .whl/
#   hvq train --workdir xdev_ckpt                         # any checkpoint; carry only its last step
#   python benchmarks/cross_device.py encode --checkpoint xdev_ckpt --dir xdev_cpu
# then on the device (carry .whl, xdev_ckpt, xdev_cpu):
#   bash benchmarks/device_xdev.sh xdev_ckpt xdev_cpu
# It decodes the CPU-made files on the GPU, makes GPU files, and leaves in $OUT the JSON
# and the GPU-made files; decode those back here with
#   python benchmarks/cross_device.py decode --checkpoint xdev_ckpt --dir <fetched>/xdev_gpu
set -eu
ckpt=$1; cpu_files=$2
out=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax; print(jax.devices())"
python3 benchmarks/cross_device.py decode --checkpoint "$ckpt" --dir "$cpu_files" | tee "$out/decode_on_gpu.log"
cp "$cpu_files"/decode_*.json "$out/" || true
python3 benchmarks/cross_device.py encode --checkpoint "$ckpt" --dir "$out/xdev_gpu" | tail -5
tar -C "$out" -czf "$out/xdev_gpu.tgz" xdev_gpu && rm -rf "$out/xdev_gpu"
