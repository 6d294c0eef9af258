"""`hvq train`: the config flags, multi-host start-up, the training run."""
import os
import sys


def _default_config_path() -> str:
  import hvq_jax.configs as configs
  return os.path.join(os.path.dirname(configs.__file__), "tiny_cpu.py")


def run(argv):
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
    from hvq_jax.training import distributed, train, workdir_lock
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
            ckpt_lib.CheckpointCorrupt, workdir_lock.WorkdirLocked,
            train.TrainingDiverged) as e:
      sys.exit(f"hvq train: {e}")
    if out["preempted"]:
      # A distinct code: SLURM requeues on it and the TPU launcher resumes.
      sys.exit(train.PREEMPTED_EXIT_CODE)

  app.run(main, argv=["hvq train"] + argv)


def _kwargs_text(kwargs) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
