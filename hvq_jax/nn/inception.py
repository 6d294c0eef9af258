"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) in Flax: 2048-d pool features of
uint8 images, as torch-fidelity's `FeatureExtractorInceptionV3` and pytorch-fid compute them.

FID and KID are only comparable across papers when computed with this exact network
and input pipeline: bilinear resize to 299x299 as TensorFlow 1.x does it (not
PyTorch's or JAX's resize), then (x - 128) / 128; TF's average pools that ignore
padding; max instead of average pooling in the last block. The weights are the torch
conversion both libraries download (`pt_inception-2015-12-05-6726825d.pth`, the same
file torch-fidelity names `weights-inception-2015-12-05-6726825d.pth`); they are on no
package registry, so the user supplies the file and we read it with a tensors-only loader.
Layout NHWC; parameter names follow the torch state dict (`Mixed_5b/branch1x1/conv`).
"""
import os
from typing import Dict, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

SIZE = 299
FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
URLS = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth")
ENV = "HVQ_INCEPTION_WEIGHTS"
_HI = jax.lax.Precision.HIGHEST


class WeightsError(FileNotFoundError):
  """Inception weights missing or wrong; the message names the file and where to get it."""


def resize_like_tf1(x, size: int = SIZE):
  """Bilinear resize of NHWC float x to size x size as TF 1.x (align_corners=False,
  no half-pixel centres): source coordinate i * in / out, float32 throughout, the
  same arithmetic as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`."""
  def axis(n_in):
    g = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
    lo = g.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (g - lo.astype(np.float32)).astype(np.float32)
  ylo, yhi, dy = axis(x.shape[1])
  xlo, xhi, dx = axis(x.shape[2])
  rows_lo, rows_hi = x[:, ylo], x[:, yhi]
  dx = jnp.asarray(dx)[None, None, :, None]
  top = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
  bot = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
  return top + (bot - top) * jnp.asarray(dy)[None, :, None, None]


class BasicConv(nn.Module):
  """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU."""
  features: int
  kernel: Sequence[int] = (1, 1)
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    p = [(v, v) for v in self.padding]
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.stride, padding=p,
                use_bias=False, precision=_HI, name="conv")(x)
    f = self.features
    with_name = lambda n, init: self.param(n, init, (f,))
    bn = {k: with_name(f"bn_{k}", i) for k, i in (
        ("scale", nn.initializers.ones), ("bias", nn.initializers.zeros),
        ("mean", nn.initializers.zeros), ("var", nn.initializers.ones))}
    x = (x - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-3) * bn["scale"] + bn["bias"]
    return nn.relu(x)


def _avg3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], -1)


class InceptionE(nn.Module):
  """`max_pool`: the second E block of the TF graph max-pools its pool branch."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg3(x))
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3FID(nn.Module):
  """uint8 (or 0..255 float) NHWC images of any size -> [B, 2048] pool features."""

  @nn.compact
  def __call__(self, images):
    x = resize_like_tf1(images.astype(jnp.float32))
    x = (x - 128.0) / 128.0
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return x.mean((1, 2))


_BN = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}


def params_from_state_dict(sd: Dict[str, np.ndarray], where: str = "state dict") -> dict:
  """The torch state dict of the FID Inception -> our params (conv kernels to HWIO)."""
  expected = jax.eval_shape(lambda: InceptionV3FID().init(
      jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
  from flax import traverse_util
  want = traverse_util.flatten_dict(expected)
  out = {}
  for key, shape in want.items():
    *mod, leaf = key
    if leaf == "kernel":       # (..., 'conv', 'kernel') <- '....conv.weight' [O, I, kh, kw]
      name = ".".join(mod) + ".weight"
      conv = lambda a: np.transpose(a, (2, 3, 1, 0))
    else:                      # (..., 'bn_scale') <- '....bn.weight'
      name = ".".join(mod) + ".bn." + {v: k for k, v in _BN.items()}[leaf]
      conv = lambda a: a
    if name not in sd:
      raise WeightsError(f"{where}: not the FID Inception weights (no {name!r})")
    a = conv(np.asarray(sd[name], np.float32))
    if a.shape != tuple(shape.shape):
      raise WeightsError(f"{where}: not the FID Inception weights ({name} has shape "
                         f"{a.shape}, expected {tuple(shape.shape)})")
    out[key] = jnp.asarray(a)
  return traverse_util.unflatten_dict(out)


def _hub_dirs():
  home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
  return [os.path.join(home, "hub", "checkpoints")]


def find_weights(path: Optional[str] = None) -> str:
  """The weights file: `path` (a file or a folder holding it), $HVQ_INCEPTION_WEIGHTS,
  or torch hub's cache (where torch-fidelity / pytorch-fid leave their download)."""
  candidates = []
  for p in [path, os.environ.get(ENV)]:
    if p:
      candidates += [p] if not os.path.isdir(p) else [os.path.join(p, n) for n in FILE_NAMES]
  for d in _hub_dirs():
    candidates += [os.path.join(d, n) for n in FILE_NAMES]
  for c in candidates:
    if os.path.isfile(c):
      return c
  if path and not os.path.isdir(path):
    raise WeightsError(f"{path}: no such file (the FID Inception weights {FILE_NAMES[0]}, "
                       f"from {URLS[0]})")
  raise WeightsError(
      f"FID/KID need the Inception weights {FILE_NAMES[0]} (pytorch-fid's release, {URLS[0]}; "
      f"torch-fidelity's copy {FILE_NAMES[1]} works too); none found: pass "
      f"--inception-weights FILE to hvq eval or set ${ENV}")


def load_params(path: Optional[str] = None) -> dict:
  """Find the torch weights file and convert it (tensors only, no torch needed)."""
  from hvq_jax.interop import torch_pickle
  f = find_weights(path)
  try:
    sd = torch_pickle.load_state_dict(f)
  except torch_pickle.TorchFileError as e:
    raise WeightsError(str(e)) from None
  return params_from_state_dict(sd, f)
