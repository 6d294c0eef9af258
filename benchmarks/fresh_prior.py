"""`hvq train` for a plug-in prior that starts where the staged recipe's prior phase starts:
from `train.init_from` only the tokenizer and the static logits (`index_bias`) are taken,
the rest of the prior (H_a, H_s, the contexts' convs, the bottleneck, the mixture weight)
stays at this run's init. Plain `init_from` copies every matching array, so a plug-in on
a staged run would continue its trained prior instead; a comparison of prior variants
at equal training needs them all to start alike.

  python benchmarks/fresh_prior.py train --config configs/ablations.py:base --workdir RUN \
      --config.train.init_from=SRC --config.train.trainable=prior \
      --config.train.num_steps=480 [--config.model.hyperprior.spatial=checkerboard ...]
"""
import jax

from hvq_jax.training import optim, resume

_init_from = resume.init_from


def init_from_tokenizer(params, source: str):
  """resume.init_from, less the prior's arrays other than the static logits."""
  new, report = _init_from(params, source)
  keep = lambda p: optim.is_prior(p) and "index_bias" not in jax.tree_util.keystr(p)
  flat_init = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0])
  fresh = [jax.tree_util.keystr(p) for p in flat_init if keep(p)]
  new = jax.tree_util.tree_map_with_path(
      lambda p, leaf: flat_init[p] if keep(p) else leaf, new)
  report["loaded"] = [k for k in report["loaded"] if k not in set(fresh)]
  report["kept_init"] = sorted(set(report["kept_init"]) | set(fresh))
  print(f"fresh prior: {len(fresh)} prior arrays at init, the static logits loaded")
  return new, report


resume.init_from = init_from_tokenizer

if __name__ == "__main__":
  from hvq_jax.cli import main
  raise SystemExit(main())
