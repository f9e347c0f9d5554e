#!/bin/bash
# facejax on a multi-host Cloud TPU VM slice: the same command on every worker (--worker=all).
# Rendered by: python scripts/render_job.py tpu --config ... --workdir ... --hosts N
# jax.distributed.initialize() finds the slice from the TPU VM metadata (FACEJAX_DISTRIBUTED=auto).
# The workdir must be shared by the workers: a Filestore NFS mount or a gcsfuse mount of a bucket,
# at the same path on every worker.
set -euo pipefail
TPU={{name}}
ZONE={{zone}}

gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" \
  --accelerator-type={{tpu_type}} --version={{tpu_runtime}}

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command={{setup_cmd_quoted}}

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command={{train_cmd_quoted}}

# export on worker 0, then every worker embeds its share of the gallery (build_index under
# jax.distributed), then worker 0 evaluates. Worker 0 alone runs on its CPU: one host of a
# multi-host slice cannot open the TPU by itself.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=0 --command={{export_cmd_quoted}}

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command={{index_cmd_quoted}}

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=0 --command={{eval_cmd_quoted}}
