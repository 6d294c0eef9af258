"""What checksums cost a save and a restore of the default config's train state (on CPU).

  nice -n 5 python benchmarks/checkpoint_overhead.py [--repeats 3] \
      [--out benchmarks/results/checkpoint_overhead.json]

The state is the default config's (configs/default.py) as `hvq train` builds it: init
only, no training. A save (synchronous, so its whole time is measured) and a restore are
timed end to end, and inside them the checksum work (`checkpoint_integrity.record` at
save, `verify_arrays` at restore) is timed separately: the overhead is that time over the
rest of the save (restore). Best of `--repeats`.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/checkpoint_overhead.json")
  a = ap.parse_args(argv)
  import jax
  import numpy as np
  from hvq_jax import checkpoint as ckpt_lib
  from hvq_jax import checkpoint_integrity as integrity
  from hvq_jax.configs import default
  from hvq_jax.training.trainer import Trainer

  config = default.get_config()
  t = time.time()
  trainer = Trainer(config)
  state = jax.block_until_ready(trainer.init_state(jax.random.PRNGKey(0)))
  init_s = time.time() - t
  leaves = jax.tree.leaves(state)
  nbytes = int(sum(np.asarray(x).nbytes for x in leaves))
  print(f"default state: {len(leaves)} arrays, {nbytes / 1e6:.1f} MB (init {init_s:.0f} s)")

  # Time the checksum work inside the real save / restore.
  spent = {"record": 0.0, "verify": 0.0}
  real_record, real_verify = integrity.record, integrity.verify_arrays
  def timed(name, f):
    def g(*args, **kw):
      t0 = time.perf_counter()
      try:
        return f(*args, **kw)
      finally:
        spent[name] += time.perf_counter() - t0
    return g
  integrity.record = timed("record", real_record)
  integrity.verify_arrays = timed("verify", real_verify)
  rows = []
  root = tempfile.mkdtemp(prefix="hvq_overhead_")
  try:
    for r in range(a.repeats):
      d = os.path.join(root, f"r{r}")
      ck = ckpt_lib.Checkpointer(d, async_save=False)
      spent.update(record=0.0, verify=0.0)
      t0 = time.perf_counter()
      ck.save(0, state, None, config, force=True)
      ck.wait()
      save_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      out = jax.block_until_ready(ck.restore(0, trainer.abstract_state))
      restore_s = time.perf_counter() - t0
      ck.close()
      del out
      rows.append(dict(save_s=save_s, record_s=spent["record"], restore_s=restore_s,
                       verify_s=spent["verify"]))
      print(f"repeat {r}: save {save_s:.2f} s (checksums {spent['record']:.2f} s), "
            f"restore {restore_s:.2f} s (checksums {spent['verify']:.2f} s)")
      shutil.rmtree(d)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  best_save = min(rows, key=lambda x: x["save_s"])
  best_restore = min(rows, key=lambda x: x["restore_s"])
  pct = lambda part, total: 100.0 * part / max(total - part, 1e-9)
  summary = dict(
      state_arrays=len(leaves), state_mb=nbytes / 1e6, repeats=rows,
      save_s=best_save["save_s"], save_checksum_s=best_save["record_s"],
      save_overhead_pct=pct(best_save["record_s"], best_save["save_s"]),
      restore_s=best_restore["restore_s"], restore_checksum_s=best_restore["verify_s"],
      restore_overhead_pct=pct(best_restore["verify_s"], best_restore["restore_s"]),
      algorithm=integrity.ALGORITHM, machine=platform.processor() or platform.machine(),
      cpus=os.cpu_count(), jax=jax.__version__, devices=str(jax.devices()[0]))
  print(f"checksum overhead: save {summary['save_overhead_pct']:.1f}% "
        f"({summary['save_checksum_s']:.2f} of {summary['save_s']:.2f} s), restore "
        f"{summary['restore_overhead_pct']:.1f}% ({summary['restore_checksum_s']:.2f} of "
        f"{summary['restore_s']:.2f} s), {summary['state_mb']:.0f} MB state")
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
