"""`hvq compress` / `hvq decompress`: files and folders in, files and folders out,
never a half-written output."""
import os
import sys


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


def _output_names(files, out_dir: str, ext: str):
  """Output path per input (`a.png` -> OUT/a.hvq). Two inputs that would write one output
  (`a.png` and `a.jpg`, or `x/a.png` and `y/a.png`) are refused, naming both."""
  outs, seen = [], {}
  for path in files:
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ext)
    key = os.path.normcase(os.path.abspath(out))
    if key in seen:
      raise ValueError(f"{seen[key]} and {path} would both be written to {out}: rename one, "
                       f"or code them into different output folders")
    seen[key] = path
    outs.append(out)
  return outs


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write) -> None:
  """Write through a temporary file in the same folder, then rename: never a half file."""
  import tempfile
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".hvq-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    # mkstemp creates 0600; the output gets the mode every other tool gives a new file
    # (0666 less the umask: 0644 under umask 022).
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def run(cmd, argv):
  import argparse
  ap = argparse.ArgumentParser(prog=f"hvq {cmd}")
  ap.add_argument("inputs", nargs="+")
  ap.add_argument("-o", "--out", required=True, help="output file, or folder for several inputs")
  ap.add_argument("--checkpoint", required=True,
                  help="training workdir or its checkpoints/ (torch backend: a .safetensors export)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the newest)")
  if cmd == "decompress":
    ap.add_argument("--backend", choices=("jax", "torch"), default="jax",
                    help="torch: decode with the PyTorch model of an `hvq export --format torch` file")
  if cmd == "compress":
    ap.add_argument("--lmbda", type=float, default=None)
    ap.add_argument("--ratios", default=None, help="coarse,medium,fine fractions")
    ap.add_argument("--target-bpp", type=float, default=None)
    ap.add_argument("--no-colour", action="store_true",
                    help="send the identity colour transform: no decode at the encoder "
                         "(faster; colours drift toward grey, hvq_jax/colour.py)")
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--jobs", type=int, default=0,
                  help="worker processes for several inputs, each on its share of the cores "
                       "(0: one per core; 1: one image at a time in this process)")
  a = ap.parse_args(argv)

  # Only what coding needs: no flax unless a program has to be traced, no Orbax for a local
  # checkpoint, no training or evaluation stack (tests/test_codec_load.py checks).
  from hvq_jax import compile_cache
  compile_cache.enable()   # the user cache: a second `hvq decompress` does not recompile
  from hvq_jax import codec
  from hvq_jax import images
  from hvq_jax import jobs as jobs_lib

  exts = images.IMAGE_EXTENSIONS if cmd == "compress" else (".hvq",)
  files, to_folder = _inputs(a.inputs, exts)
  if not files:
    sys.exit(f"hvq {cmd}: no inputs found in {a.inputs}")
  if a.jobs < 0:
    sys.exit(f"hvq {cmd}: --jobs must be 0 (one per core) or more, got {a.jobs}")
  if to_folder:
    try:
      outs = _output_names(files, a.out, ".hvq" if cmd == "compress" else ".png")
    except ValueError as e:
      sys.exit(f"hvq {cmd}: {e}")
  else:
    outs = [a.out]
  options = {}
  if cmd == "compress":
    ratios = None
    if a.ratios:
      try:
        ratios = tuple(float(v) for v in a.ratios.split(","))
      except ValueError:
        sys.exit(f"hvq compress: --ratios must be three numbers like 0.1,0.4,0.5, got {a.ratios!r}")
    options = dict(lmbda=a.lmbda, ratios=ratios, target_bpp=a.target_bpp,
                   colour=not a.no_colour)
  if a.step is not None:
    options["step"] = a.step
  backend = getattr(a, "backend", "jax")
  coder_args = (cmd, a.checkpoint, backend, options)
  try:
    if backend == "torch":
      try:
        from hvq_jax.interop import export  # noqa: F401  (needs torch)
        import torch  # noqa: F401
      except ImportError as e:
        sys.exit(f"hvq {cmd}: --backend torch needs PyTorch: pip install 'hvq_jax[torch]' ({e})")
    coder = jobs_lib.Coder(*coder_args)
  except codec.CheckpointError as e:
    sys.exit(f"hvq {cmd}: {e}")
  except ValueError as e:   # ExportError
    sys.exit(f"hvq {cmd}: {e}")
  jobs = list(zip(files, outs))
  workers = a.jobs or len(jobs_lib.cores())
  bar = None
  if not (a.no_progress or len(files) == 1):
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit="img")
  failed = jobs_lib.run(coder, jobs, workers, coder_args,
                        progress=bar.update if bar is not None else lambda: None)
  if bar is not None:
    bar.close()
  if failed and len(jobs) > 1:
    print(f"hvq {cmd}: {len(failed)} of {len(jobs)} files failed:", file=sys.stderr)
  for path, why in failed:
    print(f"hvq {cmd}: {path}: {why}", file=sys.stderr)
  return 1 if failed else 0
