"""`hvq` command line: train | compress | decompress | eval | export."""
import os
import sys

USAGE = """usage: hvq COMMAND [options]

commands:
  train       --config configs/X.py --workdir DIR [--config.field=value ...]
              (defaults: the tiny CPU config on the bundled photos, workdir runs/tiny_cpu)
  compress    IMAGE_OR_FOLDER... -o OUT --checkpoint DIR [--lmbda L] [--ratios c,m,f]
              [--target-bpp B]
  decompress  FILE_OR_FOLDER... -o OUT --checkpoint DIR
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


def _inputs(paths, extensions):
  """Expand files and folders; returns (files, out_is_folder)."""
  files, folder = [], False
  for p in paths:
    if os.path.isdir(p):
      folder = True
      files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(extensions))
    else:
      files.append(p)
  return files, folder or len(files) > 1


def _atomic_write(path: str, write) -> None:
  """Write through a temporary file in the same folder, then rename: never a half file."""
  import tempfile
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".hvq-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _codec_command(cmd, argv):
  import argparse
  ap = argparse.ArgumentParser(prog=f"hvq {cmd}")
  ap.add_argument("inputs", nargs="+")
  ap.add_argument("-o", "--out", required=True, help="output file, or folder for several inputs")
  ap.add_argument("--checkpoint", required=True, help="training workdir or its checkpoints/")
  if cmd == "compress":
    ap.add_argument("--lmbda", type=float, default=None)
    ap.add_argument("--ratios", default=None, help="coarse,medium,fine fractions")
    ap.add_argument("--target-bpp", type=float, default=None)
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)

  from tqdm import tqdm
  from PIL import Image
  from hvq_jax import codec, images
  from hvq_jax.bitstream import BitstreamError
  from hvq_jax.model import ConfigError

  exts = images.IMAGE_EXTENSIONS if cmd == "compress" else (".hvq",)
  files, to_folder = _inputs(a.inputs, exts)
  if not files:
    sys.exit(f"hvq {cmd}: no inputs found in {a.inputs}")
  ratios = None
  if cmd == "compress" and a.ratios:
    try:
      ratios = tuple(float(v) for v in a.ratios.split(","))
    except ValueError:
      sys.exit(f"hvq compress: --ratios must be three numbers like 0.1,0.4,0.5, got {a.ratios!r}")
  try:
    model = codec.load_model(a.checkpoint)
  except codec.CheckpointError as e:
    sys.exit(f"hvq {cmd}: {e}")
  failures = 0
  for path in tqdm(files, disable=a.no_progress or len(files) == 1, unit="img"):
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(a.out, stem + (".hvq" if cmd == "compress" else ".png")) if to_folder else a.out
    try:
      if cmd == "compress":
        data = codec.compress(model, images.read_image(path), lmbda=a.lmbda, ratios=ratios,
                              target_bpp=a.target_bpp)
        def write(tmp):
          with open(tmp, "wb") as f:
            f.write(data)
      else:
        with open(path, "rb") as f:
          img = codec.decompress(model, f.read())
        write = lambda tmp: Image.fromarray(img).save(tmp, format="PNG")
      _atomic_write(out, write)
    except (BitstreamError, images.ImageError, ConfigError, OSError, ValueError) as e:
      failures += 1
      print(f"hvq {cmd}: {path}: {e}", file=sys.stderr)
  return 1 if failures else 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0 if argv else 2
  cmd, rest = argv[0], argv[1:]
  if cmd == "train":
    return _train(rest)
  if cmd in ("compress", "decompress"):
    return _codec_command(cmd, rest)
  print(f"hvq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
