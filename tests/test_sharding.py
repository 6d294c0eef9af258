"""Sharded and multi-process training: same numbers on any mesh, checkpoints that move."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import jax
import pytest

from hvq_jax import codec
from hvq_jax import images
from hvq_jax.training import sharding

WORKER = os.path.join(os.path.dirname(__file__), "multidevice_worker.py")


def _env(n):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
              JAX_PLATFORMS="cpu")


def _run(args, n=8, timeout=900):
  r = subprocess.run([sys.executable, WORKER, *args], env=_env(n), capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]


# ---- short versions (default suite): micro model, 2 steps, 8 emulated devices ----------
# One job of two processes x 4 CPU devices covers the three slow tests below in short: the
# (4, 2) mesh across both processes against one device, and its checkpoint coded on one.
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("short")
  port = _free_port()
  env = dict(_env(4), JAX_COMPILATION_CACHE_DIR=os.environ.get(
      "HVQ_TEST_JIT_CACHE", "/tmp/hvq_jax_test_jit_cache"))
  procs = [subprocess.Popen([sys.executable, WORKER, "short", str(d / "short.json"),
                             str(d / "run"), str(i), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=1200)
    assert p.returncode == 0, err[-3000:]
  return json.loads((d / "short.json").read_text()), str(d / "run")


@pytest.mark.slow   # ~3 min of compiles on 2 cores: over the default suite's budget
def test_short_two_process_mesh_matches_single_device(short_run):
  res, _ = short_run
  assert res["processes"] == 2 and res["devices"] == 8
  # Same maths, another reduction order across 8 devices and 2 processes: round-off only.
  np.testing.assert_allclose(res["mesh"]["losses"], res["ref_losses"], rtol=2e-5)
  assert res["mesh"]["param_sum"] == pytest.approx(res["ref_param_sum"], rel=1e-5)
  diffs = {k: v for k, v in res["param_rel_diff"].items() if not k.endswith("['k']['bias']")}
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] < 1e-4, (worst, diffs[worst])
  assert res["mesh"]["fsdp_sharded_params"] > 0      # the fsdp axis really splits params


@pytest.mark.slow   # ~3 min of compiles on 2 cores: over the default suite's budget
def test_short_checkpoint_from_8_devices_codes_on_1(short_run):
  _, wd = short_run
  from hvq_jax import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.all_steps() == [0, 2] and ck.restore_config()["mesh"]["shape"] == [4, 2]
  # written by two processes: each left its data iterator
  assert sorted(p.name for p in ck.data_file(2).parent.iterdir() if "process" in p.name) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  ck.close()
  model = codec.load_model(wd)   # this process: 1 CPU device
  img = images.bundled_photo("coffee")[:64, :80]
  out = codec.decompress(model, codec.compress(model, img))
  assert out.shape == img.shape and out.dtype == np.uint8


def test_mesh_shape_rules():
  assert sharding.mesh_shape((-1, 2), 8) == (4, 2)
  assert sharding.mesh_shape((4, 2), 8) == (4, 2)
  with pytest.raises(sharding.MeshError, match="does not divide"):
    sharding.mesh_shape((3, -1), 8)
  with pytest.raises(sharding.MeshError, match="8 are visible"):
    sharding.mesh_shape((2, 2), 8)
  with pytest.raises(sharding.MeshError, match="at most one -1"):
    sharding.mesh_shape((-1, -1), 8)


@pytest.mark.slow
def test_meshes_match_single_device(tmp_path):
  out = tmp_path / "m.json"
  _run(["meshes", str(out)])
  res = json.loads(out.read_text())
  assert res["devices"] == 8
  for shape, r in res["meshes"].items():
    # Same maths, different reduction order across devices: f32 round-off only.
    np.testing.assert_allclose(r["losses"], res["ref_losses"], rtol=2e-5, err_msg=shape)
    # Attention key biases have an exactly zero gradient (softmax is shift-invariant), so
    # Adam normalises pure round-off there: their values are noise on every mesh.
    diffs = {k: v for k, v in r["param_rel_diff"].items() if not k.endswith("['k']['bias']")}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, (shape, worst, diffs[worst])
    assert r["logit_gathers"] == [], (shape, r["logit_gathers"])
  assert res["meshes"]["(1, 8)"]["fsdp_sharded_params"] > 0
  assert res["meshes"]["(8, 1)"]["fsdp_sharded_params"] == 0


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  out = tmp_path / "mp.json"
  procs = [subprocess.Popen([sys.executable, WORKER, "multiprocess", str(out), str(i), str(port)],
                            env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  ref = tmp_path / "one.json"
  _run(["single8", str(ref)])
  a, b = json.loads(out.read_text()), json.loads(ref.read_text())
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=2e-5)
  assert a["param_sum"] == pytest.approx(b["param_sum"], rel=1e-5)


@pytest.mark.slow
def test_checkpoint_from_8_devices_codes_on_1(tmp_path):
  wd = str(tmp_path / "run")
  _run(["train", wd])
  model = codec.load_model(wd)   # this process: 1 CPU device
  img = images.bundled_photo("coffee")[:64, :80]
  out = codec.decompress(model, codec.compress(model, img))
  assert out.shape == img.shape


@pytest.mark.slow   # ~3 min of compiles on 2 cores: over the default suite's budget
def test_short_resume_with_another_process_count(short_run):
  """The two-process checkpoint resumes in this one process: the state reshards onto a
  one-device mesh, and grain's iterator (saved as process_{i}-of-2.json) starts afresh
  with a warning instead of failing."""
  _, wd = short_run
  from hvq_jax.training import train
  from tests.multidevice_worker import SHORT_MESH, short_config
  c = short_config(SHORT_MESH)
  c.mesh.shape = (-1, 1)          # a safe change on resume
  with pytest.warns(UserWarning, match=r"process_0-of-2.json, process_1-of-2.json.*1 "
                                       r"process\(es\): the data stream starts afresh"):
    out = train.train_and_evaluate(c, wd, progress=False)
  assert int(out["state"]["step"]) == 2
  ref = codec.load_model(wd).params
  np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(out["state"]["params"]))[0],
                                jax.tree.leaves(jax.device_get(ref))[0])
