"""The training recipe as phases: which params train, and which prior prices the rate.

  tokenizer  encoder, codebooks, decoder and the static code (the hyperprior branches'
             `index_bias`, or the static histograms with the hyperprior off); the rate is
             priced by that static code, so no z and no hyper-synthesis are computed
  prior      the index prior alone (hyperprior branches) on the frozen tokenizer, on the
             rate; the tokenizer's params and Adam moments do not move
  joint      everything, the rate priced by the hyperprior (the paper's one-run recipe)

`train.recipe='staged'` runs tokenizer, then prior (the `train.prior_fraction` of the
steps), then joint (`train.finetune_fraction`, 0 by default); 'joint' runs one joint phase.
Fractions, not step counts, so that any `train.num_steps` has the same recipe. A plug-in prior
(`train.trainable='prior'`) is one prior phase; a model without a hyperprior has only the
tokenizer phase. A run's phase follows from its step, so a resume continues the phase
its checkpoint was in.
"""
from typing import List, NamedTuple

PHASES = ("tokenizer", "prior", "joint")


class Phase(NamedTuple):
  name: str
  start: int    # first step (0-based) of the phase
  end: int      # one past its last step
  lr: float     # peak learning rate of its warmup-cosine schedule

  @property
  def steps(self) -> int:
    return self.end - self.start


def plan(config) -> List[Phase]:
  """The phases of a config's run, in order, covering steps 0..train.num_steps (a run of 0
  steps: its first phase, empty)."""
  tc = config.train
  n = int(tc.num_steps)
  if tc.trainable == "prior":
    spec = [("prior", n, tc.prior_lr)]
  elif not config.model.hyperprior.enabled:
    spec = [("tokenizer", n, tc.lr)]
  elif tc.recipe == "joint":
    spec = [("joint", n, tc.lr)]
  else:
    p, f = round(n * tc.prior_fraction), round(n * tc.finetune_fraction)
    spec = [("tokenizer", n - p - f, tc.lr), ("prior", p, tc.prior_lr),
            ("joint", f, tc.finetune_lr)]
  out, start = [], 0
  for name, steps, lr in spec:
    if steps > 0:
      out.append(Phase(name, start, start + steps, float(lr)))
      start += steps
  return out or [Phase(spec[0][0], 0, 0, float(spec[0][2]))]


def errors(config) -> List[str]:
  """What makes a config's recipe impossible, each naming the field (empty: fine)."""
  tc, h = config.train, config.model.hyperprior
  out = []
  if tc.recipe not in ("staged", "joint"):
    out.append(f"config.train.recipe must be 'staged' or 'joint', got {tc.recipe!r}")
    return out
  p, f = tc.prior_fraction, tc.finetune_fraction
  if not (0 <= p < 1 and 0 <= f < 1 and p + f < 1):
    out.append(f"config.train.prior_fraction ({p}) and finetune_fraction ({f}) must be in "
               f"[0, 1) with a sum below 1: the tokenizer phase has the rest of the steps")
  staged = tc.recipe == "staged" and tc.trainable == "all" and h.enabled
  if staged and not h.index_bias:
    out.append("config.train.recipe='staged' prices the tokenizer phase with the hyperprior's "
               "static logits: it needs model.hyperprior.index_bias=True "
               "(or config.train.recipe='joint')")
  return out


def index(phases: List[Phase], step: int) -> int:
  """Which phase step `step` (0-based) is in; steps past the end are in the last."""
  return next((i for i, p in enumerate(phases) if step < p.end), len(phases) - 1)


def describe(phases: List[Phase]) -> str:
  """One line for the log: 'tokenizer 0-600, prior 600-800'."""
  return ", ".join(f"{p.name} {p.start}-{p.end}" for p in phases)
