"""`hvq` command line: train | compress | decompress | eval | export."""
import os
import sys

USAGE = """usage: hvq COMMAND [options]

commands:
  train   --config configs/X.py --workdir DIR [--config.field=value ...]
          (defaults: the tiny CPU config on the bundled photos, workdir runs/tiny_cpu)
"""


def _default_config_path() -> str:
  import configs
  return os.path.join(os.path.dirname(configs.__file__), "tiny_cpu.py")


def _train(argv):
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", "runs/tiny_cpu", "Where checkpoints and logs go.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  config_flags.DEFINE_config_file("config", _default_config_path(), "Training config file.",
                                  lock_config=True)

  def main(_):
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO
    from hvq_jax import model as model_lib
    from hvq_jax import train
    try:
      train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                               progress=flags.FLAGS.progress)
    except (model_lib.ConfigError, FileNotFoundError) as e:
      sys.exit(f"hvq train: {e}")

  app.run(main, argv=["hvq train"] + argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd == "train":
    return _train(rest)
  print(f"hvq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
