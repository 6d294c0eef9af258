"""Feeding the device: grain workers, batches put on the mesh ahead of the step, and a
training loop that reads step outputs only at log steps."""
import json
import os
import sys

import jax
import numpy as np
import grain
import pytest
from PIL import Image
from jax.sharding import NamedSharding, PartitionSpec as P

from hvq_jax.configs import tiny_cpu
from hvq_jax.training import data, train
from tests.conftest import train_config


def test_auto_num_workers():
  assert data.auto_num_workers("gpu", 16) == 8
  assert data.auto_num_workers("tpu", 4) == 3
  assert data.auto_num_workers("gpu", 1) == 0
  assert data.auto_num_workers("cpu", 64) == 0      # XLA computes the step on those cores
  c = tiny_cpu.get_config()
  assert c.data.num_workers == -1
  assert data.num_workers(c.data) == 0               # the tests run on the CPU backend
  c.data.num_workers = 3
  assert data.num_workers(c.data) == 3
  c.data.num_workers = -2
  with pytest.raises(ValueError, match="auto"):
    data.num_workers(c.data)
  assert c.data.read_threads == -1
  assert data.read_threads(c.data, 0) == 2            # CPU backend: 2 threads in-process
  assert data.read_threads(c.data, 4) == 2            # 2 in each worker
  c.data.read_threads = 5
  assert data.read_threads(c.data, 0) == 5


def test_workers_need_a_guarded_main(tmp_path, monkeypatch):
  """grain spawns its workers, which run the main script again: a script without a
  `__main__` guard gets no workers under 'auto' and an error when it asks for some."""
  script = tmp_path / "train_script.py"
  script.write_text("print('training')\n")
  fake_main = type(sys)("__main__")
  fake_main.__file__ = str(script)
  monkeypatch.setitem(sys.modules, "__main__", fake_main)
  assert not data.spawn_safe_main()
  c = _config(2, _images(tmp_path))
  with pytest.raises(ValueError, match="guard"):
    data.train_dataset(c)
  monkeypatch.setattr(data, "num_workers", lambda cfg: 2)      # as 'auto' on a GPU host
  c.data.num_workers = -1
  with pytest.warns(UserWarning, match="no worker processes"):
    assert data.train_dataset(c).num_workers == 0
  script.write_text("if __name__ == '__main__':\n  print('training')\n")
  assert data.spawn_safe_main()


def _source_iter(n=7):
  batches = [np.full((2, 4, 4, 3), i, np.uint8) for i in range(n)]
  return grain.MapDataset.source(batches).to_iter_dataset().__iter__()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_device_prefetch_order_sharding_and_state(depth):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  puts = []
  def put(x):
    puts.append(int(x[0, 0, 0, 0]))
    return jax.device_put(x, sharding)
  feed = data.DevicePrefetch(_source_iter(), put, depth)
  ref = _source_iter()
  assert feed.get_state() == ref.get_state()
  for i in range(5):
    b = next(feed)
    assert isinstance(b, jax.Array) and b.sharding == sharding
    assert int(b[0, 0, 0, 0]) == i                    # the source's order
    assert len(puts) == min(i + depth, 7)             # depth - 1 batches already put
    next(ref)
    assert feed.get_state() == ref.get_state()        # the state after the batches handed over
  # the checkpoint item is that state as grain's handler writes it; a fresh iterator
  # restored from it goes on with the next batch
  saved = json.loads(feed.checkpoint_item().get_state().decode())
  again = _source_iter()
  again.set_state(saved)
  assert int(next(again)[0, 0, 0, 0]) == 5
  assert [int(b[0, 0, 0, 0]) for b in feed] == [5, 6]  # a finite source ends cleanly


def _config(workers, folder):
  c = tiny_cpu.get_config()
  c.train.batch_size, c.image_size = 2, 32
  c.data.source, c.data.train_dir = "folder", str(folder)
  c.data.num_workers, c.data.worker_buffer_size = workers, 1
  return c


def _images(folder, n=5):
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  return folder


def _check_workers(folder, workers):
  want = [next(it) for it in [iter(data.train_dataset(_config(0, folder)))] for _ in range(6)]
  it = iter(data.train_dataset(_config(workers, folder)))
  assert it.num_workers == workers
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  it.close()
  assert json.loads(state) == {"next_index": 3}
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  back = iter(data.train_dataset(_config(0, folder)))
  back.set_state(state)
  np.testing.assert_array_equal(next(back), want[3])
  return want


def test_worker_stream_and_position_state(tmp_path):
  """A grain worker process makes the batches the in-process pipeline makes; the
  checkpointed state is the position alone, so a run resumes with any number of workers,
  and grain's own mp_prefetch states (checkpoints of runs with workers made before
  TrainStream) are read as positions."""
  folder = _images(tmp_path)
  want = _check_workers(folder, 1)
  back = iter(data.train_dataset(_config(0, folder)))
  back.set_state(json.dumps({"next_index": 4}).encode())
  np.testing.assert_array_equal(next(back), want[4])
  old = {"next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices":
         [0, 1], "iterators_in_use_states": [{"next_index": 3}, {"next_index": 2}],
         "exhausted": [0, 0], "future_states": {}}
  assert data.stream_position(json.dumps(old, indent=4).encode()) == 5
  back.set_state(json.dumps(old).encode())
  np.testing.assert_array_equal(next(back), want[5])


@pytest.mark.slow
def test_two_workers_give_the_same_stream(tmp_path):
  """grain hands out the batches of several workers in turn: the same stream (~15 s on
  2 cores: two spawned processes start and stop)."""
  _check_workers(_images(tmp_path), 2)


class _Unread:
  """A step output that the loop may wait on (block_until_ready) but not read."""

  def __init__(self, value, step):
    self.value, self.step = value, step

  def block_until_ready(self):
    self.value.block_until_ready()
    return self

  def _read(self, *args, **kwargs):
    raise AssertionError(f"the training loop read an output of step {self.step}, "
                         f"which neither logs nor saves")

  __array__ = __float__ = __int__ = __bool__ = __index__ = __format__ = _read
  item = tolist = copy_to_host_async = _read

  @property
  def shape(self):
    return self.value.shape


def test_loop_reads_step_outputs_only_at_log_steps(trainer, straight, tmp_path, monkeypatch):
  """Steps 1 and 2 neither log nor save: their outputs (metrics and state) reach the loop
  as objects that raise on any read, so a float()/np.asarray/device_get/f-string of them
  fails the test; only block_until_ready is allowed. Step 3 logs and saves. The final
  state equals the straight run's: prefetching kept the batch order."""
  c = train_config()
  c.train.log_every, c.train.ckpt_every = 3, 100
  real_step = trainer.train_step
  calls = []

  def unwrap(tree):
    return jax.tree.map(lambda a: a.value if isinstance(a, _Unread) else a, tree,
                        is_leaf=lambda a: isinstance(a, _Unread))

  def step(state, batch):
    calls.append(batch)
    assert isinstance(batch, jax.Array) and batch.sharding == trainer.batch_sharding
    state, m = real_step(unwrap(state), batch)
    n = len(calls)
    if n % c.train.log_every and n != c.train.num_steps:
      state, m = jax.tree.map(lambda a: _Unread(a, n), (state, m))
    return state, m

  monkeypatch.setattr(trainer, "train_step", step)
  out = train.train_and_evaluate(c, str(tmp_path), progress=True, trainer=trainer)
  assert len(calls) == 3
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [3]
  _, ref = straight
  for a, b in zip(jax.tree.leaves(jax.device_get(out["state"]["params"])),
                  jax.tree.leaves(ref["params"])):
    np.testing.assert_array_equal(a, b)
