"""One of two processes (4 CPU devices each) saving, damaging and resuming a synthetic
train state split over both processes: the checksums, the fallback and the lock across
processes (tests/test_checkpoint_integrity.py runs two of these)."""
import json
import os
import sys
import types
import warnings

import numpy as np
import jax


def main(workdir, pid, port, out):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
  from jax.sharding import NamedSharding, PartitionSpec as P
  from hvq_jax import checkpoint as ckpt_lib
  from hvq_jax.training import resume, workdir_lock
  from tests import conftest
  mesh = jax.make_mesh((8,), ("fsdp",))
  split, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())

  def state(step):
    rng = np.random.default_rng(step)
    host = dict(step=np.int32(step), params={"w": rng.normal(size=(16, 3)).astype(np.float32),
                                             "b": rng.normal(size=(5,)).astype(np.float32)})
    shard = dict(step=rep, params={"w": split, "b": rep})
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(
        a.shape, s, lambda idx: a[idx]), host, shard), host

  config = conftest.micro_config()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state(0)[0])
  trainer = types.SimpleNamespace(abstract_state=abstract, phases=[])
  result = {}
  lock = workdir_lock.hold(workdir)
  try:
    # a second holder refuses on every process
    try:
      workdir_lock.hold(workdir)
      result["second_lock"] = "taken"
    except workdir_lock.WorkdirLocked as e:
      result["second_lock"] = str(e)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    for s in (0, 4):
      ck.save(s, state(s)[0], None, config, force=True)
    ck.wait()
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("saved")
    if int(pid) == 0:   # damage step 4: every data file of its state
      import glob
      for p in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "d", "*"),
                         recursive=True):
        b = bytearray(open(p, "rb").read())
        m = len(b) // 2
        b[m:m + 64] = bytes(x ^ 0xFF for x in b[m:m + 64])
        open(p, "wb").write(bytes(b))
    multihost_utils.sync_global_devices("damaged")
    ck.reload()
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      restored, start = resume.restore_or_init(ck, trainer, config, None, False, workdir)
    result["start"] = start
    result["warnings"] = [str(x.message) for x in w]
    from hvq_jax import checkpoint_integrity as integrity
    got = integrity.host_leaves(restored)
    want = integrity.leaves(state(0)[1])
    result["equal"] = all(np.array_equal(got[k], np.asarray(want[k])) for k in want)
    result["steps_after"] = ck.all_steps()
    ck.close()
  finally:
    lock.release()
  with open(f"{out}.{pid}.json", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  main(*sys.argv[1:])
