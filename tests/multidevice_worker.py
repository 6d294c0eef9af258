"""Run by tests/test_sharding.py in subprocesses with several emulated CPU devices.

  python tests/multidevice_worker.py meshes OUT.json
  python tests/multidevice_worker.py multiprocess OUT.json PROCESS_ID PORT
  python tests/multidevice_worker.py train WORKDIR
  python tests/multidevice_worker.py short OUT.json WORKDIR PROCESS_ID PORT  (default suite)
"""
import json
import os
import re
import sys

import numpy as np
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.conftest import micro_config  # noqa: E402
from hvq_jax.training import sharding, train  # noqa: E402

STEPS = 2
BATCH = 8


def config(shape, fsdp_min_size=1024):
  c = micro_config()
  c.train.batch_size = BATCH
  c.mesh.shape = shape
  c.mesh.fsdp_min_size = fsdp_min_size
  return c


SHORT_MESH = (4, 2)   # data x fsdp: batch split 8 ways, large params split over fsdp


def short_config(shape):
  """The short (default-suite) runs: STEPS steps, a schedule of STEPS steps, so that the
  stepping trainer also writes the workdir."""
  c = config(shape)
  c.train.num_steps, c.train.log_every = STEPS, 1
  c.train.async_checkpoint = False
  c.eval.enabled = False
  return c


def batches():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (BATCH, 64, 64, 3), dtype=np.uint8) for _ in range(STEPS)]


def run(c, devices=None, rows=slice(None)):
  trainer = train.Trainer(c, devices=devices)
  return run_with(trainer, rows)


def run_with(trainer, rows=slice(None)):
  state = trainer.init_state(jax.random.PRNGKey(0))
  losses = []
  for b in batches():
    state, m = trainer.train_step(state, trainer.shard_batch(b[rows]))
    losses.append(float(m["loss"]))
  params = train.host_params(trainer, state["params"])
  return trainer, state, losses, params


def max_rel_diff(a, b):
  out = {}
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    out[jax.tree_util.keystr(p)] = float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
  return out


def all_gathers_of_logits(trainer, state, batch, k):
  """Shapes of all-gathers in the compiled step whose last dim is K (the [.., K] logits)."""
  text = trainer.train_step.lower(state, trainer.shard_batch(batch)).compile().as_text()
  bad = []
  for line in text.splitlines():
    if "all-gather(" in line:
      for dims in re.findall(r"f32\[([\d,]+)\]", line.split("all-gather(")[0]):
        shape = [int(d) for d in dims.split(",")]
        if shape[-1] == k and np.prod(shape) >= BATCH * 16 * 16 * k:
          bad.append(shape)
  return bad


def meshes(out):
  _, _, ref_losses, ref_params = run(config((1, 1)), devices=jax.devices()[:1])
  res = dict(devices=jax.device_count(), ref_losses=ref_losses, meshes={})
  for shape in [(8, 1), (4, 2), (1, 8), (-1, 2)]:
    trainer, state, losses, params = run(config(shape))
    sharded = [jax.tree_util.keystr(p) for p, s in jax.tree_util.tree_flatten_with_path(
        trainer.state_shardings["params"])[0] if any(s.spec)]
    res["meshes"][str(shape)] = dict(
        losses=losses, param_rel_diff=max_rel_diff(params, ref_params),
        fsdp_sharded_params=len(sharded),
        logit_gathers=all_gathers_of_logits(trainer, state, batches()[0], trainer.config.model.codebook_size))
  with open(out, "w") as f:
    json.dump(res, f)


def multiprocess(out, pid, port):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  half = BATCH // 2
  _, _, losses, params = run(config((8, 1)), rows=slice(pid * half, (pid + 1) * half))
  if pid == 0:
    with open(out, "w") as f:
      json.dump(dict(losses=losses, param_sum=float(sum(np.sum(np.abs(x)) for x in jax.tree.leaves(params)))), f)
  jax.distributed.shutdown()


def single8(out):
  _, _, losses, params = run(config((8, 1)))
  with open(out, "w") as f:
    json.dump(dict(losses=losses, param_sum=float(sum(np.sum(np.abs(x)) for x in jax.tree.leaves(params)))), f)


def train_workdir(workdir):
  c = config((4, 2))
  c.train.num_steps, c.train.log_every = 2, 1
  c.train.async_checkpoint = False
  c.eval.enabled = False
  train.train_and_evaluate(c, workdir, progress=False)


def _summary(trainer, state, losses, params):
  sharded = [jax.tree_util.keystr(p) for p, s in jax.tree_util.tree_flatten_with_path(
      trainer.state_shardings["params"])[0] if any(s.spec)]
  return dict(losses=losses, fsdp_sharded_params=len(sharded),
              param_sum=float(sum(np.sum(np.abs(x)) for x in jax.tree.leaves(params))))


def _barrier(name):
  """A barrier of the coordination service (not a collective)."""
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, 600_000)


def short(out, workdir, pid, port):
  """The default suite's one multi-device job: two processes of 4 CPU devices each.
  Both train STEPS steps on the (4, 2) mesh across all 8 devices, each feeding its half
  of every batch, and save the result as a checkpoint (Orbax, collectively, with each
  process's data iterator); process 0 also trains on one of its own devices alone, the
  reference.

  gloo sets up a context at each program's first collective and gives up after 30 s, so
  every program is compiled ahead and both processes meet at a barrier before running
  it (under load, two compiles of one program can differ by more than that)."""
  from hvq_jax import checkpoint as ckpt_lib
  from hvq_jax.training import data as data_lib
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  half = BATCH // 2
  c = short_config(SHORT_MESH)
  trainer = train.Trainer(c)
  key = jax.random.PRNGKey(0)
  init = trainer.init_state.lower(key).compile()
  _barrier("init")
  state = init(key)
  data = batches()
  step = trainer.train_step.lower(state, trainer.shard_batch(data[0][pid * half:(pid + 1) * half])).compile()
  _barrier("step")
  losses = []
  for b in data:
    state, m = step(state, trainer.shard_batch(b[pid * half:(pid + 1) * half]))
    losses.append(float(m["loss"]))
  rep = sharding.replicated(trainer.mesh)
  gather = jax.jit(lambda p: p, out_shardings=rep).lower(state["params"]).compile()
  _barrier("gather")
  params = jax.device_get(gather(state["params"]))
  res = dict(processes=jax.process_count(), devices=jax.device_count(),
             mesh=_summary(trainer, state, losses, params))
  it = iter(data_lib.train_dataset(c, pid, 2))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ck.save(0, init(key), it, c, force=True)
  ck.save(STEPS, state, it, c, force=True)
  ck.close()
  if pid == 0:
    _, _, ref_losses, ref_params = run(short_config((1, 1)), devices=jax.local_devices()[:1])
    res.update(ref_losses=ref_losses, param_rel_diff=max_rel_diff(params, ref_params),
               ref_param_sum=float(sum(np.sum(np.abs(x)) for x in jax.tree.leaves(ref_params))))
    with open(out, "w") as f:
      json.dump(res, f)
  _barrier("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  cmd = sys.argv[1]
  if cmd == "meshes":
    meshes(sys.argv[2])
  elif cmd == "multiprocess":
    multiprocess(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  elif cmd == "single8":
    single8(sys.argv[2])
  elif cmd == "train":
    train_workdir(sys.argv[2])
  elif cmd == "short":
    short(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
