"""Loading a model for the codec fast: params read from the checkpoint without Orbax or a
model init, equal to Orbax's restore; compiled programs loaded from the executable cache;
a decode that imports no training stack (and with warm caches, not even flax)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax import checkpoint_direct as ckpt_direct
from hvq_jax import codec
from hvq_jax import compile_cache
from hvq_jax.codec import model as codec_model


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory):
  """A workdir as `hvq train` lays it out, two steps: 3 of a run without EMA, 4 of one
  with (both hold params and ema_params, next to other subtrees, one of them a list)."""
  cfg, _, params = micro
  params = jax.device_get(params)
  ema = jax.tree.map(lambda a: a + np.float32(0.5), params)
  ema_cfg = cfg.copy_and_resolve_references()
  ema_cfg.train.ema_decay = 0.999
  d = str(tmp_path_factory.mktemp("load"))
  ck = ckpt_lib.Checkpointer(os.path.join(d, "checkpoints"), async_save=False)
  for step, c in ((3, cfg), (4, ema_cfg)):
    state = {"params": jax.device_put(params), "ema_params": jax.device_put(ema),
             "step": np.int32(step), "opt_g": [{"count": np.int32(step)}, {"mu": jnp.zeros(3)}]}
    ck.save(step, state, None, c, force=True)
  ck.close()
  return d, params, ema


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_metadata_loading_equals_orbax_restore(saved):
  """The codec's loading (TensorStore, shapes from the checkpoint) gives exactly the params
  Orbax restores onto the model init's shapes (the old path), and so does the Orbax path
  with the metadata's structure (used for gs://); EMA params when the run kept them."""
  d, params_want, ema_want = saved
  ckdir = ckpt_lib.find_checkpoints(d)
  assert ckpt_direct.local_step_config(ckdir)[0] == 4
  assert ckpt_direct.read_params(ckdir, 3, "params") is not None
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  config, params = codec.load_params(d, step=3)
  old_config, old = codec_model._restore_with_orbax(d, ckdir, 3, one, from_init=True)
  _, meta = codec_model._restore_with_orbax(d, ckdir, 3, one)
  assert config.to_dict() == old_config.to_dict()
  _assert_same(params, old)
  _assert_same(meta, old)
  _assert_same(params, params_want)
  assert all(isinstance(x, jax.Array) and x.sharding == one for x in jax.tree.leaves(params))
  config, ema = codec.load_params(d)   # newest step: the EMA run
  assert config.train.ema_decay == 0.999
  _, ema_meta = codec_model._restore_with_orbax(d, ckdir, None, one)
  _assert_same(ema, ema_want)
  _assert_same(ema_meta, ema_want)


def test_unknown_layouts_fall_back_to_orbax(saved, tmp_path):
  import shutil
  d = str(tmp_path / "copy")
  shutil.copytree(saved[0], d)
  ckdir = os.path.join(d, "checkpoints")
  os.unlink(os.path.join(ckdir, "4", "commit_success.txt"))   # Orbax does not need it locally
  assert ckpt_direct.local_step_config(ckdir) is None
  assert ckpt_direct.local_step_config(ckdir, 3)[0] == 3
  assert ckpt_direct.local_step_config(ckdir, 7) is None
  assert ckpt_direct.local_step_config("gs://bucket/run/checkpoints") is None
  _, ema = codec.load_params(d)   # through Orbax
  _assert_same(ema, saved[2])
  assert ckpt_direct.read_params(ckdir, 3, "no_such_subtree") is None
  assert ckpt_direct.read_params(ckdir, 3, "opt_g") is None   # a list: Orbax's business
  with pytest.raises(codec.CheckpointError, match="no such checkpoint directory"):
    codec.load_params(str(tmp_path / "missing"))


def test_executable_cache_round_trip_and_bad_files(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)   # it would win (compile_cache)
  before_dir = jax.config.jax_compilation_cache_dir
  before_enabled = dict(compile_cache._enabled)
  try:
    assert compile_cache.enable(str(tmp_path / "jc")) == str(tmp_path / "jc")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    make = lambda: (lambda a: jnp.sin(a) * 3.0 + a.sum())
    want = np.asarray(jax.jit(make())(x))
    first = compile_cache.executable("t", make, (x,), key="k")
    np.testing.assert_array_equal(np.asarray(first(x)), want)
    files = os.listdir(tmp_path / "jc" / compile_cache.EXECUTABLES)
    assert len(files) == 1 and files[0].startswith("t-")
    compile_cache._memo.clear()
    loaded = compile_cache.executable("t", lambda: pytest.fail("traced again"), (x,), key="k")
    assert isinstance(loaded, compile_cache._Loaded)
    np.testing.assert_array_equal(np.asarray(loaded(x)), want)
    path = os.path.join(tmp_path / "jc" / compile_cache.EXECUTABLES, files[0])
    with open(path, "wb") as f:
      f.write(b"not a pickle")
    compile_cache._memo.clear()
    again = compile_cache.executable("t", make, (x,), key="k")   # not loadable: plain jit
    np.testing.assert_array_equal(np.asarray(again(x)), want)
    assert not os.path.exists(path) and os.path.exists(path + ".broken")
    compile_cache._memo.clear()
    assert not isinstance(compile_cache.executable("t", make, (x,), key="k"), compile_cache._Loaded)
    compile_cache._memo.clear()
    other = compile_cache.executable("t", make, (x,), key="k2")   # another key: another file
    np.testing.assert_array_equal(np.asarray(other(x)), want)
    assert len([f for f in os.listdir(tmp_path / "jc" / compile_cache.EXECUTABLES)
                if f.endswith(".pkl")]) == 1
  finally:
    compile_cache._memo.clear()
    compile_cache._enabled.update(before_enabled)
    jax.config.update("jax_compilation_cache_dir", before_dir)


_DECODE = """
import json, sys
from hvq_jax import cli
rc = cli.main(["decompress", sys.argv[1], "-o", sys.argv[2], "--checkpoint", sys.argv[3]])
mods = ["hvq_jax.training", "hvq_jax.evaluation", "hvq_jax.interop", "optax", "orbax",
        "orbax.checkpoint", "grain", "tensorflow", "matplotlib", "torch", "flax",
        "hvq_jax.nn.model"]
print(json.dumps(dict(rc=rc, loaded={m: m in sys.modules for m in mods})))
"""


def test_decode_imports_no_training_stack_and_warm_decode_no_flax(saved, tmp_path):
  """`hvq decompress` as a user runs it, twice with one cache: the cold run traces (flax),
  the warm one loads every program compiled and imports neither flax nor the networks;
  neither imports Orbax (local checkpoint), the trainer, optax, grain or evaluation."""
  from hvq_jax import images
  d = saved[0]
  m = codec.load_model(d)
  data = codec.compress(m, images.bundled_photo("coffee")[:40, :72])
  src = tmp_path / "a.hvq"
  src.write_bytes(data)
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("HVQ_NO_COMPILATION_CACHE", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  runs = []
  for i in range(2):
    out = tmp_path / f"d{i}.png"
    r = subprocess.run([sys.executable, "-c", _DECODE, str(src), str(out), d], env=env,
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[-1]["rc"] == 0
  want = codec.decompress(m, data)
  for i, run in enumerate(runs):
    np.testing.assert_array_equal(images.read_image(str(tmp_path / f"d{i}.png")), want)
    heavy = {k: v for k, v in run["loaded"].items() if v and k not in ("flax", "hvq_jax.nn.model")}
    assert not heavy, (i, heavy)
  assert runs[0]["loaded"]["flax"]          # cold: the decoder was traced
  assert not runs[1]["loaded"]["flax"] and not runs[1]["loaded"]["hvq_jax.nn.model"], runs[1]
  cache = tmp_path / "cache" / "hvq_jax" / "jax" / compile_cache.EXECUTABLES
  assert any(f.startswith("decode_latents-") for f in os.listdir(cache))
