"""Checkpoints you can trust: damage is named and skipped, one writer per workdir.

Checkpoints here are small synthetic train states saved by the real `Checkpointer` (no
model, no training), so every test runs in seconds; the faults harness
(benchmarks/checkpoint_faults.py) runs on a real run's checkpoints.
"""
import glob
import json
import os
import socket
import sys
import time
import types
import warnings

import jax
import numpy as np
import pytest

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax import codec
from hvq_jax.training import resume, workdir_lock
from tests import conftest

ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def synthetic_state(step: int) -> dict:
  """A train state's shape: params, EMA params (what the codec reads), optimiser moments."""
  rng = np.random.default_rng(step)
  p = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                "bias": rng.normal(size=(8,)).astype(np.float32)},
       "dense": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)}}
  tree = dict(step=np.int32(step), params=p, ema_params=jax.tree.map(lambda a: a * 0.5, p),
              opt={"mu": jax.tree.map(lambda a: a * 0.1, p)})
  return jax.tree.map(lambda a: jax.device_put(np.asarray(a), ONE), tree)


def config():
  c = conftest.micro_config()
  c.train.ema_decay = 0.999   # the codec reads ema_params
  return c


def make(tmp_path, steps=(0, 4)) -> str:
  """A workdir with checkpoints at `steps`, as `hvq train` writes them (with checksums)."""
  wd = str(tmp_path / "run")
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  for s in steps:
    ck.save(s, synthetic_state(s), None, config(), force=True)
  ck.close()
  return wd


def fake_trainer():
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=ONE),
                          synthetic_state(0))
  return types.SimpleNamespace(abstract_state=abstract, phases=[],
                               init_state=lambda key: synthetic_state(0))


def host(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def assert_same(a, b):
  a, b = host(a), host(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def data_files(step_dir):
  return [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
          if os.path.isfile(p)]


def invert(path, n=64):
  b = bytearray(open(path, "rb").read())
  m = max(len(b) // 2 - n // 2, 0)
  b[m:m + n] = bytes(x ^ 0xFF for x in b[m:m + n])
  open(path, "wb").write(bytes(b))


def resume_from(wd):
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  try:
    return resume.restore_or_init(ck, fake_trainer(), config(), None, False, wd)
  finally:
    ck.close()


def test_flipped_params_bytes_are_refused_by_the_codec_naming_the_step(tmp_path):
  wd = make(tmp_path)
  _, intact = codec.load_params(wd)
  assert_same(intact, synthetic_state(4)["ema_params"])
  for p in data_files(os.path.join(wd, "checkpoints", "4")):   # every array of step 4
    invert(p)
  with pytest.raises(codec.CheckpointCorrupt) as e:
    codec.load_params(wd)
  msg = str(e.value)
  assert "\n" not in msg and "step 4" in msg and "--step" in msg and "steps: 4, 0" in msg
  # the older step is still there to choose, and it is what was saved
  _, older = codec.load_params(wd, step=0)
  assert_same(older, synthetic_state(0)["ema_params"])
  # the Orbax path (a URL, or a layout the fast reader does not know) refuses the same way
  with pytest.raises(codec.CheckpointCorrupt, match="step 4"):
    codec.model._restore_with_orbax(wd, os.path.join(wd, "checkpoints"), None, ONE)


def test_truncated_newest_step_falls_back_to_the_older_intact_one(tmp_path):
  wd = make(tmp_path)
  biggest = max(data_files(os.path.join(wd, "checkpoints", "4")), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(100)
  with pytest.warns(UserWarning, match="checkpoint step 4 .*skipped"):
    state, start = resume_from(wd)
  assert start == 0
  assert_same(state, synthetic_state(0))
  # the damaged step is kept, out of the way, as it was
  moved = os.path.join(wd, "checkpoints.damaged", "4", os.path.relpath(
      biggest, os.path.join(wd, "checkpoints", "4")))
  assert os.path.getsize(moved) == 100
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["0"]


def test_no_intact_step_refuses_and_changes_nothing(tmp_path):
  wd = make(tmp_path)
  for s in ("0", "4"):
    os.unlink(os.path.join(wd, "checkpoints", s, "config", "metadata"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ckpt_lib.CheckpointCorrupt, match="no intact checkpoint") as e:
      resume_from(wd)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["0", "4"]


def test_damaged_checksum_record_and_data_are_named(tmp_path):
  wd = make(tmp_path, steps=(0,))
  rec = os.path.join(wd, "checkpoints", "0", "integrity", "metadata")
  text = open(rec).read()
  assert '"crc": ' in text
  open(rec, "w").write(text.replace('"crc": ', '"crc": 1', 1))
  with pytest.raises(ckpt_lib.CheckpointCorrupt, match="integrity: .*own checksum"):
    codec.load_params(wd)


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
  wd = make(tmp_path, steps=(0,))
  import shutil
  shutil.rmtree(os.path.join(wd, "checkpoints", "0", "integrity"))
  meta = os.path.join(wd, "checkpoints", "0", "_CHECKPOINT_METADATA")
  m = json.load(open(meta))
  del m["item_handlers"]["integrity"]
  json.dump(m, open(meta, "w"))
  ckpt_lib.integrity._warned.clear()
  with pytest.warns(UserWarning, match="no checksums"):
    _, params = codec.load_params(wd)
  assert_same(params, synthetic_state(0)["ema_params"])


def test_leftover_unfinished_save_does_not_stop_a_resume(tmp_path):
  wd = make(tmp_path)
  tmp = os.path.join(wd, "checkpoints", "6.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(tmp, "state"))
  open(os.path.join(tmp, "state", "_METADATA"), "w").write("{")
  with pytest.warns(UserWarning, match="unfinished save"):
    state, start = resume_from(wd)
  assert start == 4
  assert_same(state, synthetic_state(4))
  assert not os.path.exists(tmp)


def test_a_second_lock_taker_refuses_naming_the_holder(tmp_path):
  wd = str(tmp_path / "wd")
  with workdir_lock.hold(wd):
    with pytest.raises(workdir_lock.WorkdirLocked) as e:
      workdir_lock.hold(wd)
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "\n" not in msg
  # released: the next run takes it
  workdir_lock.hold(wd).release()
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))


@pytest.mark.parametrize("url", [False, True])
@pytest.mark.parametrize("holder", ["dead_pid_here", "expired_lease_elsewhere"])
def test_a_stale_lock_is_taken_over(tmp_path, holder, url):
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  now = time.time()
  h = dict(host=socket.gethostname(), pid=2 ** 22 + 7, started=now - 99, lease_until=now + 300)
  if holder == "expired_lease_elsewhere":
    h.update(host="elsewhere", pid=os.getpid(), lease_until=now - 1)
  path = os.path.join(wd, workdir_lock.LOCK_NAME)
  json.dump(h, open(path, "w"))
  with pytest.warns(UserWarning, match="took over a stale lock"):
    lock = workdir_lock.WorkdirLock(("file://" + wd) if url else wd).acquire()
  assert json.load(open(path))["pid"] == os.getpid()
  assert json.load(open(path))["host"] == socket.gethostname()
  lock.release()


def test_a_live_lock_elsewhere_is_respected_and_a_lost_lock_stops_saves(tmp_path):
  wd = str(tmp_path / "wd")
  lock = workdir_lock.WorkdirLock(wd).acquire()
  path = os.path.join(wd, workdir_lock.LOCK_NAME)
  h = dict(host="elsewhere", pid=1, started=time.time(), lease_until=time.time() + 300)
  json.dump(h, open(path, "w"))   # another host took it over (this one was frozen)
  lock.renew()
  with pytest.raises(workdir_lock.WorkdirLocked, match="lost its lock to host elsewhere"):
    lock.check()
  lock.release()
  assert json.load(open(path))["host"] == "elsewhere"   # never removes another's lock
  with pytest.raises(workdir_lock.WorkdirLocked, match="host elsewhere"):
    workdir_lock.WorkdirLock(wd).acquire()


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c"])
def test_checksums_are_those_of_the_c_order_little_endian_bytes(algorithm):
  import zlib
  import google_crc32c
  ref = {"crc32": zlib.crc32, "crc32c": google_crc32c.value}[algorithm]
  entry = lambda x: ckpt_lib.integrity.array_entry(x, algorithm)["crc"]
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert entry(a) == ref(a.tobytes())
  assert entry(a.astype(">f4")) == ref(a.tobytes())
  assert entry(a.T) == ref(np.ascontiguousarray(a.T).tobytes())


def test_fault_harness_sample(tmp_path):
  """20 cases of benchmarks/checkpoint_faults.py on the synthetic checkpoints."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from benchmarks import checkpoint_faults as faults
  wd = make(tmp_path, steps=(0, 2))
  h = faults.Harness(wd, str(tmp_path), config=config(), trainer=fake_trainer(),
                     data_iter=None)
  results = [h.case(seed) for seed in range(20)]
  bad = [r for r in results if faults.failed(r)]
  assert not bad, bad[:3]
  assert {r["resume"] for r in results} <= {"refused", "resumed_intact"}


@pytest.mark.parametrize("url", [False, True])
@pytest.mark.parametrize("stale", [False, True])
def test_racing_lock_takers_one_wins(tmp_path, url, stale):
  """Eight takers at once, of a fresh lock or of one stale lock: exactly one holds it."""
  import threading
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  if stale:
    json.dump(dict(host=socket.gethostname(), pid=2 ** 22 + 9, started=0, lease_until=0),
              open(os.path.join(wd, workdir_lock.LOCK_NAME), "w"))
  won, lost, go = [], [], threading.Barrier(8)
  def take():
    go.wait()
    try:
      won.append(workdir_lock.WorkdirLock(("file://" + wd) if url else wd).acquire())
    except workdir_lock.WorkdirLocked as e:
      lost.append(str(e))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert len(won) == 1 and len(lost) == 7, lost
  assert json.load(open(os.path.join(wd, workdir_lock.LOCK_NAME)))["token"] == won[0]._token
  won[0].release()


def test_two_processes_verify_fall_back_and_lock(tmp_path):
  """A state split over two processes (FSDP over 8 devices): one lock for the run (the
  second taker refuses on both), checksums of the split arrays agree between save and
  restore, a damaged newest step is skipped on both and the older one restores."""
  import subprocess
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_checkpoint_worker.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = str(tmp_path / "out")
  procs = [subprocess.Popen([sys.executable, worker, str(tmp_path / "wd"), str(i), str(port),
                             out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  r = [json.load(open(f"{out}.{i}.json")) for i in range(2)]
  assert "in use by another training run" in r[0]["second_lock"]
  assert "process 0 could not take" in r[1]["second_lock"]
  assert [x["start"] for x in r] == [0, 0] and all(x["equal"] for x in r)
  assert all(x["steps_after"] == [0] for x in r)
  assert "checkpoint step 4" in r[0]["warnings"][0]
  assert os.path.isdir(tmp_path / "wd" / "checkpoints.damaged" / "4")


def test_unreadable_step_metadata_is_moved_aside_by_a_writer_only(tmp_path):
  """Orbax reads every step's `_CHECKPOINT_METADATA` when it opens the folder: one that
  parses but is not step metadata stopped it. A writer now sets that step aside (another
  step reads), a reader names it."""
  wd = make(tmp_path)
  meta = os.path.join(wd, "checkpoints", "4", "_CHECKPOINT_METADATA")
  m = json.load(open(meta))
  # a flipped bit in a key, where custom metadata is not empty: Orbax raises
  m["perfor}ance_metrics"] = m.pop("performance_metrics")
  m["custom_metadata"] = {"note": "x"}
  json.dump(m, open(meta, "w"))
  with pytest.raises(ckpt_lib.CheckpointCorrupt, match="step 4 .*step metadata.*--step"):
    ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True)
  with pytest.warns(UserWarning, match="step 4 .*step metadata: cannot be read"):
    state, start = resume_from(wd)
  assert start == 0
  assert_same(state, synthetic_state(0))
  assert json.load(open(os.path.join(wd, "checkpoints.damaged", "4", "_CHECKPOINT_METADATA"))) == m
