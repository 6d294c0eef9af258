#!/usr/bin/env bash
# Train hvq_jax on a Cloud TPU VM slice (one process per TPU host, JAX multi-controller),
# resume after spot preemption by recreating the slice, and delete it when training ends.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=hvq-v4-32 ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/hvq/run1 CONFIG=configs/default.py \
#   launch/tpu_vm.sh --config.train.batch_size=256 --config.data.source=tfds \
#     --config.data.tfds_name=imagenet2012 --config.data.tfds_data_dir=gs://my-bucket/tfds
#
# Arguments after the script are passed to `hvq train` exactly as given (quote them as
# for any command: --config.mesh.shape='(-1,4)').
#
# Variables (defaults in brackets):
#   PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE   where and what to create (required):
#                     v4-8/16/32..., v5litepod-8/16... (v5e), v5p-8/16..., v6e-8/16...
#   RUNTIME_VERSION   TPU software version [from ACCELERATOR_TYPE: v4 tpu-ubuntu2204-base,
#                     v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
#   PYTHON_VERSION [3.12]  these images ship Python 3.10; hvq_jax needs >= 3.11 (and jax
#                     >= 0.11 needs 3.12): uv installs this Python into ~/hvq_venv on every host
#   QUEUED [0]        1: create through a queued resource (waits for capacity)
#   SPOT [0]          1: spot capacity. A preempted slice (or suspended queued resource)
#                     cannot be restarted: it is deleted and recreated, and training resumes
#                     from the newest checkpoint in WORKDIR (up to MAX_RESTARTS times [20])
#   WORKDIR           checkpoints + logs, gs://... so every host sees them (required)
#   CONFIG [configs/default.py]
#   KEEP [0]          1: keep the slice after training instead of deleting it
#   STEP [all]        create | install | train | tail | delete | all
#                     (all: create, install, train, wait; recreate on preemption; delete)
#   DRY_RUN [0]       1: print the gcloud commands instead of running them. Answers to the
#                     state queries come, one per line, from the file DRY_RUN_ANSWERS.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}" "${WORKDIR:?set WORKDIR (gs://...)}"
if [[ $WORKDIR != gs://* ]]; then
  echo "WORKDIR=$WORKDIR: use a gs:// URL (every TPU host must see the same checkpoints)" >&2
  exit 2
fi
case $ACCELERATOR_TYPE in
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$default_runtime}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
CONFIG=${CONFIG:-configs/default.py}
QUEUED=${QUEUED:-0}; SPOT=${SPOT:-0}; KEEP=${KEEP:-0}; STEP=${STEP:-all}
MAX_RESTARTS=${MAX_RESTARTS:-20}; DRY_RUN=${DRY_RUN:-0}; POLL=${POLL:-60}
PREEMPTED_RC=75   # `hvq train` saved a checkpoint on SIGTERM and stopped
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
WORKER_SCRIPT=/tmp/hvq_run_$TPU_NAME.sh

# gcloud, or in dry-run mode its command line (and for state queries the next answer).
G() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ gcloud --project=%q' "$PROJECT" >&2; printf ' %q' "$@" >&2; echo >&2
    if [[ " $* " == *" describe "* || " $* " == *" --worker=0 "* ]]; then
      local answer; answer=$(head -n 1 "${DRY_RUN_ANSWERS:?DRY_RUN needs DRY_RUN_ANSWERS}")
      sed -i 1d "$DRY_RUN_ANSWERS"
      [[ $answer == rc=* ]] && return "${answer#rc=}"
      echo "$answer"
    fi
    return 0
  fi
  gcloud --project="$PROJECT" "$@"
}
ssh_all() { G compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
log() { echo "[tpu_vm.sh] $*" >&2; }

node_state() {   # READY, PREEMPTED, TERMINATED, ... or NOT_FOUND
  local s; s=$(G compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
                 --format='value(state)') || s=""
  echo "${s:-NOT_FOUND}"
}
qr_state() {     # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...
  local s; s=$(G compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE" \
                 --format='value(state.state)') || s=""
  echo "${s:-NOT_FOUND}"
}

create() {
  local spot=(); [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    G compute tpus queued-resources create "$TPU_NAME-qr" --zone="$ZONE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    local state
    while true; do
      state=$(qr_state)
      case $state in
        ACTIVE) return 0 ;;
        FAILED|SUSPENDED|SUSPENDING|NOT_FOUND)
          log "queued resource $TPU_NAME-qr is $state"; return 1 ;;
        *) log "queued resource $TPU_NAME-qr: $state; waiting"; sleep "$POLL" ;;
      esac
    done
  else
    G compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

install() {
  # This checkout (tracked files) on every host; a Python >= 3.11 virtualenv (uv fetches
  # the interpreter), TPU jax, and the extras: gcs (gs:// files), lpips (the LPIPS
  # weights the default config trains with), tfds.
  (cd "$REPO_DIR" && git archive --format=tar.gz -o /tmp/hvq_jax_src.tgz HEAD)
  G compute tpus tpu-vm scp /tmp/hvq_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
  ssh_all "set -e; rm -rf ~/hvq_jax && mkdir -p ~/hvq_jax && tar xzf /tmp/hvq_jax_src.tgz -C ~/hvq_jax \
    && python3 -m pip install -q --user -U uv \
    && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION ~/hvq_venv \
    && ~/.local/bin/uv pip install -q --python ~/hvq_venv/bin/python -U 'jax[tpu]' -e ~/hvq_jax'[tfds,gcs,lpips]' \
    && ~/hvq_venv/bin/python -c 'import sys, jax, hvq_jax; assert sys.version_info >= (3, 11); print(sys.version.split()[0], jax.__version__)'"
}

train() {
  # The same command on every host, written to a script so that the arguments arrive as
  # given; hvq train calls jax.distributed.initialize() (the TPU hosts are found through
  # the metadata server). Only process 0 writes logs. Its exit code goes to ~/hvq_train.rc.
  {
    echo '#!/usr/bin/env bash'
    echo 'cd ~/hvq_jax || exit 1'
    printf '~/hvq_venv/bin/hvq train --distributed=on --noprogress --config %q --workdir %q' \
      "$CONFIG" "$WORKDIR"
    if (( ${#TRAIN_ARGS[@]} )); then printf ' %q' "${TRAIN_ARGS[@]}"; fi
    echo ' > ~/hvq_train.log 2>&1'
    echo 'echo $? > ~/hvq_train.rc'
  } > "$WORKER_SCRIPT"
  G compute tpus tpu-vm scp "$WORKER_SCRIPT" "$TPU_NAME":hvq_run.sh --zone="$ZONE" --worker=all
  ssh_all "rm -f ~/hvq_train.rc; nohup bash ~/hvq_run.sh > /dev/null 2>&1 < /dev/null & echo started on \$(hostname)"
}

tail_logs() {
  # Follow worker 0's log until its training command has written its exit code (no
  # process matching: a pattern matches the very shell that runs it); exit with that code.
  # 255: the connection failed (slice preempted or gone).
  G compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command="\
    tail -n +1 -F ~/hvq_train.log 2>/dev/null & T=\$!; \
    while [ ! -s ~/hvq_train.rc ]; do sleep \${HVQ_TAIL_POLL:-30}; done; kill \$T; \
    exit \$(cat ~/hvq_train.rc)"
}

delete() {
  if [[ $QUEUED == 1 ]]; then
    G compute tpus queued-resources delete "$TPU_NAME-qr" --zone="$ZONE" --force --quiet
  else
    G compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  fi
}

slice_alive() {
  if [[ $QUEUED == 1 ]]; then [[ $(qr_state) == ACTIVE ]] || return 1; fi
  [[ $(node_state) == READY ]]
}

run_all() {
  local restarts=0 rc
  until create; do
    restarts=$((restarts + 1)); (( restarts <= MAX_RESTARTS )) || { log "giving up"; return 1; }
    delete || true
  done
  install; train
  while true; do
    rc=0; tail_logs || rc=$?
    if [[ $rc == 0 ]]; then log "training finished"; return 0; fi
    if [[ $rc != "$PREEMPTED_RC" && $rc != 255 ]]; then
      log "hvq train failed (exit code $rc): see ~/hvq_train.log on worker 0"; return "$rc"
    fi
    if slice_alive; then
      if [[ $rc == 255 ]]; then log "lost the connection; following the log again"; continue; fi
      log "stopped on SIGTERM (maintenance?) with a checkpoint; training again"; train; continue
    fi
    restarts=$((restarts + 1))
    (( restarts <= MAX_RESTARTS )) || { log "preempted $restarts times; giving up"; return 1; }
    log "slice preempted: deleting and recreating it (restart $restarts of $MAX_RESTARTS)"
    delete || true
    until create; do
      restarts=$((restarts + 1)); (( restarts <= MAX_RESTARTS )) || { log "giving up"; return 1; }
      delete || true
    done
    install; train
  done
}

TRAIN_ARGS=("$@")
case $STEP in
  create) create ;; install) install ;; train) train ;; tail) tail_logs ;;
  delete) delete ;;
  all) rc=0; run_all || rc=$?
       if [[ $KEEP == 1 ]]; then log "KEEP=1: the slice stays up"; else delete; fi
       exit "$rc" ;;
  *) echo "unknown STEP=$STEP" >&2; exit 2 ;;
esac
