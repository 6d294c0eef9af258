"""`hvq` command line: train | compress | decompress | eval | export."""
import sys

USAGE = """usage: hvq COMMAND [options]

commands:
  train       --config configs/X.py --workdir DIR [--config.field=value ...]
              (defaults: the tiny CPU config on the bundled photos, workdir runs/tiny_cpu)
  compress    IMAGE_OR_FOLDER... -o OUT --checkpoint DIR [--step N] [--lmbda L]
              [--ratios c,m,f] [--target-bpp B] [--jobs N]
  decompress  FILE_OR_FOLDER... -o OUT --checkpoint DIR [--step N] [--backend jax|torch] [--jobs N]
              (--backend torch: --checkpoint is an `hvq export --format torch` file;
              several inputs: N worker processes, 0 = one per core)
  eval        --checkpoint DIR [--step N] --out RESULTS_DIR [--images FOLDER|bundled:heldout|tfds:NAME[:SPLIT]]
              [--lmbdas 0.05,0.2] [--ratios 'c,m,f;c,m,f'] [--lpips-weights DIR]
              [--dataset kodak|clic2020|div2k|tecnick] [--inception-weights FILE]
              [--no-dists] [--no-fid] [--no-plots]
  plot        RESULTS_DIR... [--out DIR] [--strip IMAGE --images SPEC] [--dataset NAME]
  export      --checkpoint DIR [--step N] --format torch|stablehlo --out OUT [--size HxW]
  import      --from torch|taming|control-gic --checkpoint FILE --out DIR [--config configs/X.py]
  sweep       --config configs/X.py --workdir DIR [--variants a,b] [--grid 'f=v1,v2 ...'] [--print-only]
"""


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd == "train":
    from hvq_jax.cli import train
    return train.run(rest)
  if cmd in ("compress", "decompress"):
    from hvq_jax.cli import codec
    return codec.run(cmd, rest)
  if cmd == "eval":
    from hvq_jax.cli import evaluation
    return evaluation.run_eval(rest)
  if cmd == "plot":
    from hvq_jax.cli import evaluation
    return evaluation.run_plot(rest)
  if cmd == "export":
    from hvq_jax.cli import interop
    return interop.run_export(rest)
  if cmd == "sweep":
    from hvq_jax.evaluation import sweep
    return sweep.main(rest)
  if cmd == "import":
    from hvq_jax.cli import interop
    return interop.run_import(rest)
  print(f"hvq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2

