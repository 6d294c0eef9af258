#!/bin/bash
# How far a longer prior phase takes the saving: for each seed's frozen staged_long tokenizer
# (results/recipe_long/, trained on the corpus's 41 training photos), a fresh prior trained
# STEPS steps (the staged recipe's prior phase is 480) with context coarser + checkerboard
# and coarser + quad; each evaluated like the recipe study's runs (16 held-out photos, full
# size, real files, lambda 0.2, six ratios).
#   SEEDS="0 1" STEPS=1440 ARMS="checkerboard quad" results/prior_length/run.sh
set -euo pipefail
PY=${PY:-/work/venv/bin/python}
SRC=${SRC:-/work/runs/recipe_long}
W=${W:-/work/runs/prior_length}
STEPS=${STEPS:-1440}
DATA="--config.data.source=folder --config.data.train_dir=/work/corpus/train --config.data.eval_dir=/work/corpus/heldout"
EVAL="--images /work/corpus/heldout --fit-images /work/corpus/train --lmbdas 0.2 --ratios 0,0.2,0.8;0.1,0.4,0.5;0.3,0.4,0.3;0.5,0.3,0.2;0.7,0.2,0.1;0.9,0.1,0 --baselines jpeg --no-dists --no-fid --no-plots --no-recon"
for s in ${SEEDS-0 1}; do
  for arm in ${ARMS-checkerboard quad}; do
    d=$W/seed${s}_${arm}_${STEPS}
    if [ ! -e $d/checkpoints/$STEPS ]; then
      $PY benchmarks/fresh_prior.py train --config configs/ablations.py:staged_long --workdir $d \
        --noprogress --config.seed=$s $DATA --config.train.init_from=$SRC/staged_long__seed=$s \
        --config.train.trainable=prior --config.train.num_steps=$STEPS \
        --config.model.hyperprior.spatial=$arm
    fi
    [ -e $d/eval/summary.json ] || $PY -m hvq_jax.cli eval --checkpoint $d --out $d/eval --no-progress $EVAL
  done
done
