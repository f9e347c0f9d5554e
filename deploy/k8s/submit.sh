#!/bin/bash
# Train, then export -> build_index -> eval, on Kubernetes. Render the specs first:
#   python scripts/render_job.py k8s --config ... --workdir /workdir/runs/r50v2 --hosts 4 \
#       --image REGISTRY/facejax:cuda --out train-job.yaml
#   python scripts/render_job.py k8s-eval (same arguments) --out eval-job.yaml
set -euo pipefail
name="${1:?usage: submit.sh JOB_NAME [train-job.yaml] [eval-job.yaml]}"
kubectl apply -f "${2:-train-job.yaml}"
kubectl wait --for=condition=complete --timeout=-1s "job/${name}"
kubectl apply -f "${3:-eval-job.yaml}"
