"""Named ablation variants, each a one-field change from the tiny CPU base (big_vision style).

  hvq train --config configs/ablations.py:hyperprior_off --workdir runs/abl/hyperprior_off
  hvq sweep --config configs/ablations.py --variants base,hyperprior_off,single_scale --workdir runs/abl

On accelerators, pass `--config.model...` overrides (or copy this file over default.py).
"""
from hvq_jax.configs import tiny_cpu


def _phases(c):
  """The base's tokenizer and prior steps."""
  p = round(c.train.num_steps * c.train.prior_fraction)
  return c.train.num_steps - p, p


def _equal_time_steps(c) -> int:
  """Single-phase steps that take at least as long as the base's staged run: its tokenizer
  steps plus half its prior steps (a prior step, the tokenizer frozen, costs 0.26 of a
  tokenizer step with the quad context and 0.41 with the checkerboard on this CPU: the
  runs' images_per_s in metrics.jsonl, results/recipe_default/)."""
  n, p = _phases(c)
  return n + p // 2


def _hyperprior_off(c):
  c.model.hyperprior.update(enabled=False, context="none", spatial="none")
  c.train.update(num_steps=_equal_time_steps(c))


def _joint(c):
  """The paper's recipe: one joint run, the rate priced by the hyperprior throughout."""
  c.train.update(recipe="joint", num_steps=_equal_time_steps(c))


def _residual(c):
  c.model.update(rvq_stages=2)
  c.model.hyperprior.update(context="none", spatial="none")   # the contexts read stage 0 only


def _staged_long(c):
  """A tokenizer phase as long as the hyperprior-off run, then the base's prior phase with
  two checkerboard passes (as measured in results/recipe_long/): the prior's steps come on
  top, so the two tokenizers train equally long."""
  n, p = _equal_time_steps(c), _phases(c)[1]
  c.model.hyperprior.update(spatial="checkerboard")
  c.train.update(num_steps=n + p, prior_fraction=p / (n + p))


def _staged_long_quad(c):
  """staged_long's tokenizer phase, then a quad prior phase three times the base's: fresh
  quad priors of that length on frozen staged_long tokenizers saved 39.6% over the static
  code (two seeds, results/prior_length/)."""
  n, p = _equal_time_steps(c), 3 * _phases(c)[1]
  c.model.hyperprior.update(spatial="quad")
  c.train.update(num_steps=n + p, prior_fraction=p / (n + p))


VARIANTS = {
    "base": lambda c: None,
    "joint": _joint,
    "staged_long": _staged_long,
    "hyperprior_off": _hyperprior_off,
    "per_granularity_codebook": lambda c: c.model.update(shared_codebook=False),
    "no_rate_straight_through": lambda c: c.model.update(rate_straight_through="off"),
    "no_lambda_conditioning": lambda c: c.model.update(lambda_conditioning=False),
    # single-scale VQGAN at the fine stride: every patch is sent fine
    "single_scale": lambda c: c.granularity.update(ratios=(0.0, 0.0, 1.0)),
    "single_scale_hyperprior_off": lambda c: (c.granularity.update(ratios=(0.0, 0.0, 1.0)),
                                              _hyperprior_off(c)),
    "large_codebook": lambda c: c.model.update(codebook_size=16384),
    # the prior's contexts (the base has both: the coarser granularities' entries and the
    # map, and the 2x2 interleave's four passes): none / coarser only / passes only, and two
    # checkerboard passes in place of the four
    "no_contexts": lambda c: c.model.hyperprior.update(context="none", spatial="none"),
    "no_spatial_context": lambda c: c.model.hyperprior.update(spatial="none"),
    "no_prior_context": lambda c: c.model.hyperprior.update(context="none"),
    "spatial_checkerboard": lambda c: c.model.hyperprior.update(spatial="checkerboard"),
    "staged_long_quad": _staged_long_quad,
    # residual VQ: 2 codebooks per granularity, a hyperprior branch over each stage's indices
    "residual_vq": _residual,
    "residual_vq_hyperprior_off": lambda c: (_residual(c), _hyperprior_off(c)),
}


def get_config(name: str = "base"):
  if name not in VARIANTS:
    raise ValueError(f"unknown ablation {name!r}; choose from {sorted(VARIANTS)}")
  c = tiny_cpu.get_config()
  VARIANTS[name](c)
  c.variant = name
  return c
