#!/usr/bin/env bash
# One GPU: ResNet50 224 px bf16 training images/s at the largest batch that fits (256, else 128),
# plus input-pipeline headroom (grain over a uint8 array -> device -> augmentation). < 5 minutes.
#   bash bench/gpu.sh            (from the repo root or anywhere; needs jax with CUDA importable)
# Results: bench/out/train_throughput_gpu.json (and $OUT/ when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
# Let XLA take most of the card; the default 75% can make batch 256 spill into a smaller batch.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
timeout 240 "$PY" bench/train_throughput.py --gpu "$@" || echo "facejax GPU bench failed (rc=$?)"
if [ -n "${OUT:-}" ]; then cp bench/out/train_throughput_gpu.json "$OUT/" 2>/dev/null || true; fi
# The PyTorch peer on the same card, same model, resolution and batch (bf16 autocast,
# channels_last): eager; PEER_COMPILE=1 adds torch.compile.
PEER_PY="${PEER_PYTHON:-python3}"
batch=$("$PY" -c 'import json; print(json.load(open("bench/out/train_throughput_gpu.json"))["result"]["train_batch"])' 2>/dev/null || echo 128)
timeout 90 "$PEER_PY" bench/torch_gpu_peer.py --batch "$batch" --out bench/out/torch_gpu_peer.json || true
[ "${PEER_COMPILE:-0}" = 1 ] && timeout 150 "$PEER_PY" bench/torch_gpu_peer.py --batch "$batch" --compile --out bench/out/torch_gpu_peer_compile.json || true
if [ -n "${OUT:-}" ]; then cp bench/out/torch_gpu_peer*.json "$OUT/" 2>/dev/null || true; fi
