"""`hvq` command line: train | compress | decompress | eval | export."""
import os
import sys

USAGE = """usage: hvq COMMAND [options]

commands:
  train       --config configs/X.py --workdir DIR [--config.field=value ...]
              (defaults: the tiny CPU config on the bundled photos, workdir runs/tiny_cpu)
  compress    IMAGE_OR_FOLDER... -o OUT --checkpoint DIR [--lmbda L] [--ratios c,m,f]
              [--target-bpp B] [--jobs N]
  decompress  FILE_OR_FOLDER... -o OUT --checkpoint DIR [--backend jax|torch] [--jobs N]
              (--backend torch: --checkpoint is an `hvq export --format torch` file;
              several inputs: N worker processes, 0 = one per core)
  eval        --checkpoint DIR --out RESULTS_DIR [--images FOLDER|bundled:heldout|tfds:NAME[:SPLIT]]
              [--lmbdas 0.05,0.2] [--ratios 'c,m,f;c,m,f'] [--lpips-weights DIR]
              [--dataset kodak|clic2020|div2k|tecnick] [--inception-weights FILE]
              [--no-dists] [--no-fid] [--no-plots]
  plot        RESULTS_DIR... [--out DIR] [--strip IMAGE --images SPEC] [--dataset NAME]
  export      --checkpoint DIR --format torch|stablehlo --out OUT [--size HxW]
  import      --from torch|taming|control-gic --checkpoint FILE --out DIR [--config configs/X.py]
  sweep       --config configs/X.py --workdir DIR [--variants a,b] [--grid 'f=v1,v2 ...'] [--print-only]
"""


def _default_config_path() -> str:
  import hvq_jax.configs as configs
  return os.path.join(os.path.dirname(configs.__file__), "tiny_cpu.py")


def _train(argv):
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", "runs/tiny_cpu", "Where checkpoints and logs go.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "jax.distributed.initialize(): on = always (TPU VM slices, SLURM, Open MPI "
                    "need no other flag); auto = when launched as one of several processes "
                    "(SLURM step with several tasks, Open MPI, GKE TPU, a TPU VM slice, or "
                    "JAX_COORDINATOR_ADDRESS / --coordinator set); off = never.")
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (else from the environment)")
  flags.DEFINE_integer("num_processes", None, "number of processes (else from the environment)")
  flags.DEFINE_integer("process_id", None, "this process's index (else from the environment)")
  flags.DEFINE_string("local_device_ids", None,
                      "GPUs this process drives, e.g. 0,1,2,3 (else: SLURM one task per GPU, "
                      "or the task's block of the node's GPUs)")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume although settings that change what the run computes (lr, loss "
                    "weights, batch size, ...) differ from the checkpoint's config.")
  config_flags.DEFINE_config_file("config", _default_config_path(), "Training config file.",
                                  lock_config=True)

  def main(_):
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it renames at INFO
    from hvq_jax import checkpoint as ckpt_lib
    from hvq_jax.nn import model as model_lib
    from hvq_jax.training import distributed, train
    f = flags.FLAGS
    try:
      p = distributed.plan(f.distributed, os.environ, f.coordinator, f.num_processes,
                           f.process_id, f.local_device_ids)
    except distributed.DistributedError as e:
      sys.exit(f"hvq train: {e}")
    if p is not None:
      print(f"hvq train: jax.distributed.initialize({_kwargs_text(p['kwargs'])}): {p['reason']}",
            flush=True)
      try:
        distributed.initialize(p)
      except (ValueError, RuntimeError) as e:
        sys.exit(f"hvq train: jax.distributed.initialize() failed ({e}); on a single machine "
                 "use --distributed=off, elsewhere check the launcher's environment")
    from hvq_jax import compile_cache
    # a restart, preemption resume or re-launched slice finds its programs compiled
    compile_cache.enable(ckpt_lib.join(ckpt_lib.normalize(f.workdir), "jax_cache"))
    try:
      out = train.train_and_evaluate(f.config, f.workdir, progress=f.progress,
                                     allow_config_change=f.allow_config_change)
    except (model_lib.ConfigError, FileNotFoundError, ckpt_lib.CheckpointMismatch,
            train.TrainingDiverged) as e:
      sys.exit(f"hvq train: {e}")
    if out["preempted"]:
      # A distinct code: SLURM requeues on it and the TPU launcher resumes.
      sys.exit(train.PREEMPTED_EXIT_CODE)

  app.run(main, argv=["hvq train"] + argv)


def _kwargs_text(kwargs) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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


def _atomic_write(path: str, write) -> None:
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


def _codec_command(cmd, argv):
  import argparse
  ap = argparse.ArgumentParser(prog=f"hvq {cmd}")
  ap.add_argument("inputs", nargs="+")
  ap.add_argument("-o", "--out", required=True, help="output file, or folder for several inputs")
  ap.add_argument("--checkpoint", required=True,
                  help="training workdir or its checkpoints/ (torch backend: a .safetensors export)")
  if cmd == "decompress":
    ap.add_argument("--backend", choices=("jax", "torch"), default="jax",
                    help="torch: decode with the PyTorch model of an `hvq export --format torch` file")
  if cmd == "compress":
    ap.add_argument("--lmbda", type=float, default=None)
    ap.add_argument("--ratios", default=None, help="coarse,medium,fine fractions")
    ap.add_argument("--target-bpp", type=float, default=None)
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
    options = dict(lmbda=a.lmbda, ratios=ratios, target_bpp=a.target_bpp)
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


def _eval(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq eval")
  ap.add_argument("--checkpoint", required=True, help="training workdir or its checkpoints/")
  ap.add_argument("--out", required=True, help="results folder (results.csv, summary.json)")
  ap.add_argument("--images", default="bundled:heldout",
                  help="a folder of images (Kodak, CLIC), bundled:heldout, or tfds:NAME[:SPLIT]")
  ap.add_argument("--tfds-data-dir", default="")
  ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
  ap.add_argument("--lmbdas", default=None, help="comma-separated; default: the trained lambdas")
  ap.add_argument("--ratios", default=None, help="'c,m,f;c,m,f'; default: the trained ratios")
  ap.add_argument("--fit-images", default="bundled:train",
                  help="images the static-histogram baseline is fitted on (the training set)")
  ap.add_argument("--baselines", default="jpeg,webp,avif")
  ap.add_argument("--lpips-net", default="alexnet", choices=("alexnet", "vgg16"))
  ap.add_argument("--lpips-weights", default=None, help="folder with alexnet/vgg16 .ckpt or .safetensors")
  ap.add_argument("--no-recon", action="store_true", help="do not save our reconstructions")
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--dataset", default=None,
                  help="what the images are (kodak, clic2020, div2k, tecnick): published curves "
                       "of that dataset are drawn and BD-rated beside ours; unknown: none")
  ap.add_argument("--dists-weights", default=None,
                  help="DISTS alpha/beta (.safetensors, or DISTS_pytorch's weights.pt); "
                       "default: the bundled copy")
  ap.add_argument("--no-dists", action="store_true")
  ap.add_argument("--inception-weights", default=None,
                  help="FID Inception weights pt_inception-2015-12-05-6726825d.pth (file or "
                       "folder; default $HVQ_INCEPTION_WEIGHTS, then torch hub's cache)")
  ap.add_argument("--no-fid", action="store_true", help="skip FID/KID")
  ap.add_argument("--no-plots", action="store_true", help="do not write the RD plots")
  a = ap.parse_args(argv)
  from hvq_jax import compile_cache
  compile_cache.enable()
  from hvq_jax import codec
  from hvq_jax.evaluation import evaluate
  from hvq_jax import images
  from hvq_jax.nn.model import ConfigError
  try:
    cmodel = codec.load_model(a.checkpoint)
    settings = evaluate.parse_settings(a.lmbdas, a.ratios, cmodel)
    imgs = evaluate.load_images(a.images, a.tfds_data_dir, a.limit)
    fit = evaluate.load_images(a.fit_images, a.tfds_data_dir)
  except (codec.CheckpointError, images.ImageError, ConfigError, ValueError, ImportError) as e:
    sys.exit(f"hvq eval: {e}")
  summary = evaluate.run(cmodel, imgs, settings, a.out, fit,
                         [b for b in a.baselines.split(",") if b], a.lpips_net, a.lpips_weights,
                         save_recon=not a.no_recon, progress=not a.no_progress,
                         command="hvq eval " + " ".join(argv), dataset=a.dataset,
                         dists=not a.no_dists, dists_alpha_beta=a.dists_weights,
                         fid_kid=not a.no_fid, inception_weights=a.inception_weights)
  from hvq_jax.evaluation import report
  print("\n".join(report.lines(summary)))
  print(f"wrote {a.out}/results.csv, {a.out}/fid_kid.csv and {a.out}/summary.json")
  if not a.no_plots:
    from hvq_jax.evaluation import plots
    files = plots.rd_plots([a.out], a.out)
    print("plots: " + " ".join(f for f in files if f.endswith(".png")))
  return 0


def _plot(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq plot")
  ap.add_argument("results", nargs="+", help="folders written by hvq eval")
  ap.add_argument("--out", default=None, help="default: the first results folder")
  ap.add_argument("--strip", default=None, help="image name for a side-by-side strip")
  ap.add_argument("--images", default="bundled:heldout", help="where the strip's original is")
  ap.add_argument("--setting", default=None, help="our setting for the strip (default: middle)")
  ap.add_argument("--no-published", action="store_true")
  ap.add_argument("--dataset", default=None,
                  help="dataset of the evaluated images (default: what hvq eval recorded)")
  a = ap.parse_args(argv)
  from hvq_jax.evaluation import evaluate
  from hvq_jax import images
  from hvq_jax.evaluation import plots
  out = a.out or a.results[0]
  try:
    files = plots.rd_plots(a.results, out, not a.no_published, a.dataset)
    if a.strip:
      imgs = evaluate.load_images(a.images)
      if a.strip not in imgs:
        sys.exit(f"hvq plot: no image {a.strip!r} in {a.images} (have {sorted(imgs)})")
      files.append(plots.image_strip(a.results[0], a.strip, imgs[a.strip],
                                     os.path.join(out, f"strip_{a.strip}.png"), a.setting))
  except (FileNotFoundError, images.ImageError, KeyError) as e:
    sys.exit(f"hvq plot: {e}")
  print("\n".join(files))
  return 0


def _export(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq export")
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--format", choices=("torch", "stablehlo"), required=True)
  ap.add_argument("--out", required=True, help="torch: a .safetensors file; stablehlo: a folder")
  ap.add_argument("--size", default="512x768", help="stablehlo: padded HxW the programs take")
  a = ap.parse_args(argv)
  from hvq_jax import codec
  from hvq_jax.interop import export
  try:
    cm = codec.load_model(a.checkpoint)
    if a.format == "torch":
      _atomic_write(a.out, lambda tmp: export.save_torch(cm.params, cm.config, tmp, coding=cm))
      print(f"wrote {a.out}")
    else:
      h, w = (int(v) for v in a.size.lower().split("x"))
      for name, p in export.export_stablehlo(cm, a.out, h, w).items():
        print(f"wrote {p}")
  except (codec.CheckpointError, export.ExportError, ValueError) as e:
    sys.exit(f"hvq export: {e}")
  return 0


def _load_config_file(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  if spec is None:
    raise OSError(f"{path}: not a python config file")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _import(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq import")
  ap.add_argument("--from", dest="source", choices=("torch", "taming", "control-gic"),
                  default="torch",
                  help="torch: an `hvq export --format torch` file; taming: a taming-transformers "
                       "VQGAN; control-gic: Control-GIC's checkpoint (.ckpt/.pt/.safetensors)")
  ap.add_argument("--checkpoint", required=True, help=".safetensors or torch .ckpt/.pt")
  ap.add_argument("--out", required=True, help="workdir to write (checkpoints/ inside)")
  ap.add_argument("--config", default=None,
                  help="config file; default: the one stored in an hvq export, or the config "
                       "in configs/ that fits a taming / Control-GIC checkpoint")
  ap.add_argument("--taming", action="store_true", help="same as --from taming")
  a = ap.parse_args(argv)
  from hvq_jax import compile_cache
  compile_cache.enable()
  import jax
  import ml_collections
  from hvq_jax import checkpoint as ckpt_lib
  from hvq_jax.interop import export
  from hvq_jax.interop import import_weights
  from hvq_jax.training.trainer import Trainer
  from hvq_jax.nn.model import ConfigError
  source = "taming" if a.taming else a.source.replace("-", "_")
  try:
    if os.path.isdir(os.path.join(a.out, "checkpoints")) and os.listdir(os.path.join(a.out, "checkpoints")):
      sys.exit(f"hvq import: {a.out} already holds checkpoints; choose an empty --out")
    if source == "torch":
      tensors, model_cfg, rd = export.load_torch(a.checkpoint)
      if a.config:
        config = _load_config_file(a.config)
      else:
        from hvq_jax.configs import default
        config = default.get_config()
        config.model = model_cfg
        config.rd.lmbda = rd["lmbda"]
        config.granularity.ratios = tuple(rd["ratios"])
    else:
      from hvq_jax.interop import torch_checkpoint
      try:
        theirs, info = torch_checkpoint.state_dict(a.checkpoint)
      except torch_checkpoint.CheckpointError as e:
        sys.exit(f"hvq import: {e}")
      except ImportError as e:
        sys.exit(f"hvq import: reading a torch checkpoint needs PyTorch: pip install "
                 f"'hvq_jax[torch]' (or convert it to .safetensors) ({e})")
      kind = import_weights.detect(theirs)
      if kind != source:
        what = {"taming": "a taming VQGAN", "control_gic": "a Control-GIC"}
        sys.exit(f"hvq import: {a.checkpoint} is not {what[source]} checkpoint"
                 + (f"; it looks like {what[kind]} one: use --from {kind.replace('_', '-')}"
                    if kind else f" (its first keys: {', '.join(sorted(theirs)[:4])})"))
      if info.get("inert"):
        print(f"read {a.checkpoint}: {len(theirs)} tensors; never loaded (left inert): "
              + ", ".join(info["inert"]))
      arch = import_weights.architecture(theirs, source)
      name = a.config
      if a.config:
        config = _load_config_file(a.config)
      else:
        fit = import_weights.fitting_config(arch, source)
        base = fit or ("control_gic" if source == "control_gic" else "taming_f16_1024")
        import importlib
        config = importlib.import_module(f"hvq_jax.configs.{base}").get_config()
        name = f"configs/{base}.py"
        if fit:
          print(f"config: configs/{fit}.py (train on with --config configs/{fit}.py)")
      import_weights.check_config(config, theirs, source, name)
    init_config = ml_collections.ConfigDict(config.to_dict())
    init_config.loss.w_lpips = 0.0   # building params needs no LPIPS weights
    trainer = Trainer(init_config)
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    params = jax.device_get(state["params"])
    if source == "torch":
      new = import_weights.import_hvq(params, tensors)
    else:
      new, report = import_weights.import_tokenizer(params, theirs, source, config.model)
      print(import_weights.format_report(report, theirs))
    state = dict(state, params=jax.device_put(new, trainer.state_shardings["params"]),
                 opt_g=trainer.opt_g.init(new))
    if config.train.ema_decay > 0:
      state["ema_params"] = state["params"]
    ck = ckpt_lib.Checkpointer(os.path.join(a.out, "checkpoints"), async_save=False)
    if ck.latest_step() is not None:
      sys.exit(f"hvq import: {a.out} already holds checkpoints; choose an empty --out")
    ck.save(0, state, None, config, force=True)
    ck.close()
    print(f"wrote {a.out}/checkpoints/0 (train on with: hvq train --workdir {a.out} ...)")
    if source != "torch":
      print(f"the plug-in prior on it: hvq train --config {name} --workdir RUN "
            f"--config.train.init_from={a.out} --config.train.trainable=prior")
  except (export.ExportError, ConfigError, OSError) as e:
    sys.exit(f"hvq import: {e}")
  return 0


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
  if cmd == "eval":
    return _eval(rest)
  if cmd == "plot":
    return _plot(rest)
  if cmd == "export":
    return _export(rest)
  if cmd == "sweep":
    from hvq_jax.evaluation import sweep
    return sweep.main(rest)
  if cmd == "import":
    return _import(rest)
  print(f"hvq: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
