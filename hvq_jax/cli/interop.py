"""`hvq export` and `hvq import`: PyTorch safetensors, StableHLO, foreign tokenizers."""
import os
import sys

from hvq_jax.cli.codec import atomic_write


def run_export(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq export")
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the newest)")
  ap.add_argument("--format", choices=("torch", "stablehlo"), required=True)
  ap.add_argument("--out", required=True, help="torch: a .safetensors file; stablehlo: a folder")
  ap.add_argument("--size", default="512x768", help="stablehlo: padded HxW the programs take")
  a = ap.parse_args(argv)
  from hvq_jax import codec
  from hvq_jax.interop import export
  try:
    cm = codec.load_model(a.checkpoint, a.step)
    if a.format == "torch":
      atomic_write(a.out, lambda tmp: export.save_torch(cm.params, cm.config, tmp, coding=cm))
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


def run_import(argv):
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
