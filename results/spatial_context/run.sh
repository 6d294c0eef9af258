#!/bin/bash
# The spatial-context measurement: for each seed's frozen staged tokenizer, a fresh prior
# trained 480 steps (the staged recipe's prior phase) with context coarser + checkerboard
# ("both") and with context coarser only, and (QUAD_SEEDS) coarser + the 2x2 quad; each
# evaluated like the recipe study's runs.
#   SEEDS="0 1" QUAD_SEEDS=0 results/spatial_context/run.sh
set -euo pipefail
PY=/work/venvs/spatial/bin/python
W=/work/runs/spatial
DATA="--config.data.source=folder --config.data.train_dir=/work/corpus/train --config.data.eval_dir=/work/corpus/heldout"
EVAL="--images /work/corpus/heldout --fit-images /work/corpus/train --lmbdas 0.2 --ratios 0,0.2,0.8;0.1,0.4,0.5;0.3,0.4,0.3;0.5,0.3,0.2;0.7,0.2,0.1;0.9,0.1,0 --baselines jpeg --no-dists --no-fid --no-plots"
train() {  # seed arm spatial
  local d=$W/seed$1_$2
  [ -e $d/checkpoints/480 ] && return
  nice -n 5 $PY benchmarks/fresh_prior.py train --config configs/ablations.py:base --workdir $d --noprogress \
    --config.seed=$1 $DATA --config.train.init_from=/work/runs/recipe/base__seed=$1 \
    --config.train.trainable=prior --config.train.num_steps=480 \
    --config.model.hyperprior.context=coarser --config.model.hyperprior.spatial=$3
}
evaluate() {
  local d=$W/seed$1_$2
  [ -e $d/eval/summary.json ] && return
  nice -n 5 $PY -m hvq_jax.cli eval --checkpoint $d --out $d/eval --no-progress $EVAL
}
for s in ${SEEDS-0 1}; do
  train $s both checkerboard
  train $s coarser none
  evaluate $s both
  evaluate $s coarser
done
for s in ${QUAD_SEEDS-0}; do
  train $s quad quad
  evaluate $s quad
done
