#!/usr/bin/env bash
# One GPU, in sections (default: all three), each under its own timeout:
#   train   ResNet50 224 px bf16 training images/s at the largest batch that fits (512, 256, 128),
#           input-pipeline headroom, and the PyTorch peer on the same card (~5 min)
#   embed   embedding throughput: exported artifact vs in-process vs torchvision, f32 and bf16,
#           batch 256, then bf16 latency at batch 1 and 8 (~4 min)
#   search  exact top-k on the device at 1M x 128 and 1M x 512, query-batch sweep (~2 min)
#   remat   (not in the default set) the train section's batch again with train.remat=dots:
#           conv outputs kept, BatchNorm/ReLU recomputed in the backward (~3 min)
#   bash bench/gpu.sh embed search      (from the repo root or anywhere; needs jax with CUDA)
# Results: bench/out/*.json|md, copied to $OUT/ when that is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PEER_PY="${PEER_PYTHON:-$PY}"
SECTIONS="${*:-train embed search}"
mkdir -p bench/out
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
# Let XLA take most of the card; the default 75% can make batch 256 spill into a smaller batch.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONUNBUFFERED=1
copy_out() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT/" 2>/dev/null || true; fi; }

if [[ " $SECTIONS " == *" train "* ]]; then
  timeout 240 "$PY" bench/train_throughput.py --gpu || echo "facejax GPU train bench failed (rc=$?)"
  # The PyTorch peer: same model, resolution and batch (bf16 autocast, channels_last): eager;
  # PEER_COMPILE=1 adds torch.compile.
  batch=$("$PY" -c 'import json; print(json.load(open("bench/out/train_throughput_gpu.json"))["result"]["train_batch"])' 2>/dev/null || echo 128)
  timeout 90 "$PEER_PY" bench/torch_gpu_peer.py --batch "$batch" --out bench/out/torch_gpu_peer.json || true
  [ "${PEER_COMPILE:-0}" = 1 ] && { timeout 150 "$PEER_PY" bench/torch_gpu_peer.py --batch "$batch" --compile --out bench/out/torch_gpu_peer_compile.json || true; }
  copy_out bench/out/train_throughput_gpu.json bench/out/torch_gpu_peer*.json
fi
if [[ " $SECTIONS " == *" remat "* ]]; then
  batch=$("$PY" -c 'import json; print(json.load(open("bench/out/train_throughput_gpu.json"))["result"]["train_batch"])' 2>/dev/null || echo 256)
  timeout 200 "$PY" bench/train_throughput.py --gpu --gpu-remat dots --gpu-batches "$batch" 512 \
    || echo "facejax GPU remat bench failed (rc=$?)"
  copy_out bench/out/train_throughput_gpu_remat_dots.json
fi
if [[ " $SECTIONS " == *" embed "* ]]; then
  # torch shares the card in the same process: leave it room.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
  for dt in float32 bfloat16; do
    timeout 150 "$PY" bench/embed_throughput.py --models resnet50 efficientnet_lite0 dlib_resnet \
      --batch 256 --gallery 4096 --runs 5 --dtype $dt --json bench/out/embed_gpu_$dt.json \
      || echo "embed bench ($dt) failed (rc=$?)"
  done
  # Serving latency: the exported embedder in bf16 at batch 1 and 8 (ms per call = 1000 *
  # batch / images/s), beside torch at the same batch.
  for b in 1 8; do
    timeout 90 "$PY" bench/embed_throughput.py --models resnet50 dlib_resnet --batch $b \
      --gallery $((4 * b)) --runs 20 --dtype bfloat16 --json bench/out/embed_gpu_bfloat16_b$b.json \
      || echo "embed bench (bf16, batch $b) failed (rc=$?)"
  done
  copy_out bench/out/embed_gpu_*.json
fi
if [[ " $SECTIONS " == *" search "* ]]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
  timeout 200 "$PY" bench/ann.py --backends jax --cases 1000000x128,1000000x512 \
    --queries 8192 --exact_chunks "${EXACT_CHUNKS:-8192,65536}" --tag gpu \
    || echo "search bench failed (rc=$?)"
  copy_out bench/out/ann_gpu.md bench/out/ann_gpu.json
fi
