#!/usr/bin/env bash
# Train hvq_jax on a Cloud TPU VM slice (one process per TPU host, JAX multi-controller).
#
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=hvq-v4-32 ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/hvq/run1 CONFIG=configs/default.py \
#   EXTRA_ARGS="--config.train.batch_size=256 --config.data.source=tfds \
#               --config.data.tfds_name=imagenet2012 --config.data.tfds_data_dir=gs://my-bucket/tfds" \
#   launch/tpu_vm.sh
#
# Variables (defaults in brackets):
#   PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE   where and what to create (required)
#   RUNTIME_VERSION [tpu-ubuntu2204-base]       TPU VM image
#   QUEUED [0]        1: create through a queued resource (waits for capacity)
#   SPOT [0]          1: spot/preemptible capacity (preemption saves a checkpoint; rerun resumes)
#   WORKDIR           checkpoints + logs; use gs:// so every host sees it (required)
#   CONFIG [configs/default.py], EXTRA_ARGS []  passed to `hvq train`
#   KEEP [0]          1: keep the VM after training instead of deleting it
#   STEP [all]        create | install | train | tail | delete | all
# Re-running with STEP=train after a preemption resumes from the newest checkpoint.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}" "${WORKDIR:?set WORKDIR (gs://...)}"
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/default.py}
EXTRA_ARGS=${EXTRA_ARGS:-}
QUEUED=${QUEUED:-0}; SPOT=${SPOT:-0}; KEEP=${KEEP:-0}; STEP=${STEP:-all}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
G="gcloud --project=$PROJECT"
ssh_all() { $G compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

create() {
  local spot=(); [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    $G compute tpus queued-resources create "$TPU_NAME-qr" --zone="$ZONE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    until [[ $($G compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE" \
                 --format='value(state.state)') == ACTIVE ]]; do
      echo "waiting for the queued resource..."; sleep 60
    done
  else
    $G compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

install() {
  # Ship this checkout (tracked files) to every host, then install with TPU jax.
  (cd "$REPO_DIR" && git archive --format=tar.gz -o /tmp/hvq_jax_src.tgz HEAD)
  $G compute tpus tpu-vm scp /tmp/hvq_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
  ssh_all "mkdir -p ~/hvq_jax && tar xzf /tmp/hvq_jax_src.tgz -C ~/hvq_jax && cd ~/hvq_jax && \
    pip install -q -U 'jax[tpu]' && pip install -q -e '.[tfds]'"
}

train() {
  # Same command on every host; `hvq train` calls jax.distributed.initialize() itself
  # (TPU hosts are discovered from the metadata server). Only process 0 writes logs.
  ssh_all "cd ~/hvq_jax && nohup hvq train --config $CONFIG --workdir $WORKDIR $EXTRA_ARGS \
    --distributed=auto > ~/hvq_train.log 2>&1 & echo started on \$(hostname)"
}

tail_logs() {
  $G compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 \
    --command="tail -f ~/hvq_train.log & while pgrep -f 'hvq train' >/dev/null; do sleep 30; done; kill %1"
}

delete() {
  if [[ $QUEUED == 1 ]]; then
    $G compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" --force --quiet
  else
    $G compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  fi
}

case $STEP in
  create) create ;; install) install ;; train) train ;; tail) tail_logs ;; delete) delete ;;
  all) create; install; train; tail_logs; [[ $KEEP == 1 ]] || delete ;;
  *) echo "unknown STEP=$STEP" >&2; exit 2 ;;
esac
