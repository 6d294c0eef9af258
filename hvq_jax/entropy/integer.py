"""The integer entropy-parameter path: every frequency the range coder sees, computed the
same way on any device and in any framework (METHOD.md "Real entropy coding").

Float networks differ between devices (GPU TF32, other conv algorithms, fused ops) by far
more than any grid their outputs could be rounded to, so nothing a decoder's frequencies
depend on may come from one. Here:

* **Derivation** (once per model, from its float32 params): z's CDF tables, the quantised
  hyper-synthesis (per-channel weight scales, int multipliers and shifts), the codebook
  in fixed point, the static logits and mixture weight, and three lookup tables (exp,
  GELU, 1/sigma). It runs in float64 numpy using only IEEE-754 basic operations (+ - * /,
  sqrt, rint, frexp/ldexp), each correctly rounded, in one fixed order: no libm (whose
  exp/tanh differ in the last ulp between platforms), no BLAS, no sums whose order a
  library may pick. So its integers are bitwise the same on every IEEE-754 machine.
* **Hyper-synthesis** z_hat -> (mu, log sigma) grid indices: integer weights and
  activations; convolutions accumulate integers through float64 matmuls whose every
  partial sum is an integer below 2^53 (bounded when the layers are built), so BLAS's
  order and FMAs cannot round; requantisation by integer multiply and shift; GELU by
  table.
* **Index frequencies** from (mu, log sigma) indices: int32 fixed-point Mahalanobis
  distances, an exp table, the static logits and mixture folded in, normalised to a
  fixed total. Written once against an array namespace (numpy, or jax.numpy jitted on
  the device: int32 arithmetic is exact on every XLA backend); bounds in the comments.

Every stream's table is a row of integer weights w >= 0 summing to 2^24 - A (A = alphabet
size). Handed to constriction's `Categorical(perfect=False)` as float32 (exact: < 2^24),
its scale (2^24 - A) / sum(w) is exactly 1, so symbol k gets frequency w_k + 1 of 2^24:
exact integers, independent of constriction's float arithmetic.
"""
import dataclasses
import hashlib
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

PRECISION = 24          # constriction's Categorical: frequencies out of 2^24
VERSION = 1             # bumps whenever any integer below changes meaning

# Fixed-point formats (bits after the binary point). Changing any is a format change.
ACT_BITS = 10           # hyper-synthesis activations
LOG_SIGMA_BITS = 8      # log sigma grid: step 2^-8 (0.4% in sigma)
T_BITS = 7              # (e - mu) / sigma, in units of 2^-7
T_MAX = 1 << 11         # |t| clipped at 16 sigma: exp(-128) is far below 2^-24
LOGIT_BITS = 8          # logits in units of 2^-8 nats
EXP_ONE = 1 << 15       # exp table: round(2^15 exp(-i / 2^8)), 0 from i = 2840 on
MU_SPAN_BITS = 10       # codebook entries scaled into [-2^10, 2^10]; mu clipped at +-2^14 (16x)
ACT_MAX = 1 << 17       # activations clipped to |a| <= 2^17 (|x| <= 128)
MULT_BITS = 20          # requantisation multipliers in [2^19, 2^20]
GELU_RANGE = 8          # GELU tabulated on [-8, 8]; identity above, 0 below
BIAS_MAX = 1 << 20      # static logits clipped to +-4096 nats


class IntegerModelError(ValueError):
  """Params that cannot be turned into an exact integer entropy model; says which bound."""


# ---- deterministic float64 elementary functions (derivation only) --------------------------
_LN2_HI = 6.93147180369123816490e-01   # fdlibm's split of ln 2: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_SQRT_HALF = 0.70710678118654752440


def det_exp(x) -> np.ndarray:
  """exp in float64 from basic operations only (Cody-Waite reduction, Taylor to r^14)."""
  x = np.clip(np.asarray(x, np.float64), -700.0, 700.0)
  k = np.rint(x * _INV_LN2)
  r = (x - k * _LN2_HI) - k * _LN2_LO            # |r| <= 0.347: truncation < 1e-17
  p = np.ones_like(r)
  for n in range(14, 0, -1):
    p = 1.0 + (r / float(n)) * p
  return np.ldexp(p, k.astype(np.int32))


def det_log(y) -> np.ndarray:
  """log (y > 0) in float64 from basic operations only (frexp, atanh series)."""
  y = np.asarray(y, np.float64)
  m, e = np.frexp(y)
  low = m < _SQRT_HALF
  m = np.where(low, m * 2.0, m)
  e = np.where(low, e - 1, e).astype(np.float64)
  u = (m - 1.0) / (m + 1.0)                      # |u| <= 0.172
  u2 = u * u
  s = np.full_like(u, 1.0 / 27.0)
  for n in range(12, -1, -1):                    # sum u^(2n) / (2n + 1): truncation < 1e-19
    s = 1.0 / float(2 * n + 1) + u2 * s
  return (2.0 * u * s + e * _LN2_LO) + e * _LN2_HI


def det_sigmoid(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  ex = det_exp(-np.abs(x))
  s = 1.0 / (1.0 + ex)
  return np.where(x >= 0, s, ex * s)


def det_tanh(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  t = 1.0 - 2.0 / (det_exp(2.0 * np.abs(x)) + 1.0)
  return np.where(x < 0, -t, t)


def det_softplus(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.maximum(x, 0.0) + det_log(1.0 + det_exp(-np.abs(x)))


def det_gelu(x) -> np.ndarray:
  """flax's default (tanh-approximate) GELU."""
  x = np.asarray(x, np.float64)
  return 0.5 * x * (1.0 + det_tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


# ---- fixed tables ----------------------------------------------------------------------------
def _exp_table() -> np.ndarray:
  """round(2^15 exp(-i / 2^8)) for i = 0.. until it reaches 0 (int32)."""
  n = int(math.ceil((1 << LOGIT_BITS) * math.log(2 * EXP_ONE))) + 2
  t = np.rint(det_exp(-np.arange(n, dtype=np.float64) / (1 << LOGIT_BITS)) * EXP_ONE)
  t = t.astype(np.int32)
  return t[:int(np.argmax(t == 0)) + 1]            # ends with its first 0


def _gelu_table() -> np.ndarray:
  """round(2^8 gelu(i / 2^8)) for i in [-8 * 2^8, 8 * 2^8] (int32)."""
  lim = GELU_RANGE << ACT_BITS
  x = np.arange(-lim, lim + 1, dtype=np.float64) / (1 << ACT_BITS)
  return np.rint(det_gelu(x) * (1 << ACT_BITS)).astype(np.int32)


EXP_TABLE = _exp_table()
GELU_TABLE = _gelu_table()


def _normalise(weights: np.ndarray, total: int) -> np.ndarray:
  """Integer weights [..., A] -> floor(w * total / sum w), the shortfall added to the first
  largest entry: rows summing to exactly `total` (int64 arithmetic, exact)."""
  w = np.asarray(weights, np.int64)
  s = w.sum(-1, keepdims=True)
  out = (w * total) // np.maximum(s, 1)
  short = total - out.sum(-1)
  np.put_along_axis(out, np.argmax(w, -1)[..., None], np.take_along_axis(
      out, np.argmax(w, -1)[..., None], -1) + short[..., None], -1)
  return out


def count_weights(counts, alphabet: int) -> np.ndarray:
  """A stream whose symbol frequencies are known counts (the granularity map)."""
  return _normalise(np.asarray(counts, np.int64)[None], (1 << PRECISION) - alphabet)[0]


# ---- the derivation --------------------------------------------------------------------------
@dataclasses.dataclass
class Layer:
  """One integer conv: y = (acc * mult + bias + 2^(shift-1)) >> shift, acc = sum w * a."""
  weight: np.ndarray     # int64 [kh, kw, cin, cout]
  mult: np.ndarray       # int64 [cout]
  shift: np.ndarray      # int64 [cout]
  bias: np.ndarray       # int64 [cout]
  transpose: bool        # flax ConvTranspose(stride 2, 'SAME') rather than Conv('SAME')


@dataclasses.dataclass
class BranchTables:
  """Everything one branch's frequencies are computed from (all integers)."""
  z_weights: Optional[np.ndarray]   # int64 [C, 2r+1], rows sum to 2^24 - (2r+1); None: no z
  layers: Tuple[Layer, ...]         # hyper-synthesis, last one outputs (mu, log sigma)
  mu_bits: int                      # mu and codebook in units of 2^-mu_bits
  codebook: np.ndarray              # int32 [K, D]
  ls_lo: int                        # log-sigma index range (units 2^-LOG_SIGMA_BITS)
  ls_hi: int
  inv_mant: np.ndarray              # int32 [ls_hi - ls_lo + 1]: 2^(T-mu_bits)/sigma = m 2^-s
  inv_shift: np.ndarray             # int32 same
  bias: np.ndarray                  # int32 [K] static logits, units 2^-LOGIT_BITS
  static: np.ndarray                # int32 [K] the static (mixture) share, sums to total_static
  total_hyper: int                  # the Gaussian's share of 2^24 - K
  # hyperprior.context='coarser': the context's part of the first synthesis layer, the
  # context convs (context_in, context_full), and this branch's codebook in context units
  # 2^-ctx_bits (one model-wide scale), which finer branches' contexts read
  context: Tuple[Layer, ...] = ()
  ctx_entries: Optional[np.ndarray] = None    # int64 [K, D]
  ctx_bits: int = 0
  # hyperprior.spatial: the spatial context convs (spatial_context_in, _full), which read
  # this branch's earlier passes (entries in the same units 2^-ctx_bits)
  spatial: Tuple[Layer, ...] = ()

  def arrays(self) -> Dict[str, np.ndarray]:
    """Flat name -> array (for hashing and for storing with an export)."""
    out = {k: np.asarray(getattr(self, k)) for k in
           ("codebook", "inv_mant", "inv_shift", "bias", "static")}
    out["scalars"] = np.asarray([self.mu_bits, self.ls_lo, self.ls_hi, self.total_hyper], np.int64)
    if self.z_weights is not None:
      out["z_weights"] = self.z_weights
    for name, layers in (("layer", self.layers), ("context", self.context),
                         ("spatial", self.spatial)):
      for i, l in enumerate(layers):
        for f in ("weight", "mult", "shift", "bias"):
          out[f"{name}{i}.{f}"] = getattr(l, f)
        out[f"{name}{i}.transpose"] = np.asarray([int(l.transpose)], np.int64)
    if self.ctx_entries is not None:
      out["ctx_entries"] = self.ctx_entries
      out["ctx_bits"] = np.asarray([self.ctx_bits], np.int64)
    return out

  @classmethod
  def from_arrays(cls, a: Dict[str, np.ndarray]) -> "BranchTables":
    def stack(name):
      n = len({k.split(".")[0] for k in a if k.startswith(name) and "." in k})
      return tuple(Layer(*(np.asarray(a[f"{name}{i}.{f}"], np.int64) for f in
                           ("weight", "mult", "shift", "bias")),
                         bool(np.asarray(a[f"{name}{i}.transpose"]).reshape(-1)[0]))
                   for i in range(n))
    mu_bits, ls_lo, ls_hi, total_hyper = (int(v) for v in a["scalars"])
    return cls(np.asarray(a["z_weights"], np.int64) if "z_weights" in a else None, stack("layer"),
               mu_bits, np.asarray(a["codebook"], np.int32), ls_lo, ls_hi,
               np.asarray(a["inv_mant"], np.int32), np.asarray(a["inv_shift"], np.int32),
               np.asarray(a["bias"], np.int32), np.asarray(a["static"], np.int32), total_hyper,
               stack("context"),
               np.asarray(a["ctx_entries"], np.int64) if "ctx_entries" in a else None,
               int(np.asarray(a["ctx_bits"]).reshape(-1)[0]) if "ctx_bits" in a else 0,
               stack("spatial"))


def z_weights(bottleneck: Dict[str, np.ndarray], z_range: int) -> np.ndarray:
  """Ballé's factorized prior as integer tables [C, 2r+1]: the CDF c(n + 1/2), evaluated
  deterministically, rounded to multiples of 1/T and differenced (monotone by cumulative
  max); the tails below -r and above r go to the end symbols (z_hat is clipped there)."""
  n_layers = len([k for k in bottleneck if k.startswith("matrix")])
  x = np.arange(-z_range, z_range + 2, dtype=np.float64) - 0.5     # 2r + 2 CDF points
  c = np.asarray(bottleneck["matrix0"]).shape[0]
  h = np.broadcast_to(x, (c, 1, x.size)).astype(np.float64)
  for i in range(n_layers):
    mat = det_softplus(np.asarray(bottleneck[f"matrix{i}"], np.float64))   # [C, out, in]
    acc = mat[:, :, 0:1] * h[:, 0:1, :]
    for j in range(1, mat.shape[2]):                                        # fixed order
      acc = acc + mat[:, :, j:j + 1] * h[:, j:j + 1, :]
    h = acc + np.asarray(bottleneck[f"bias{i}"], np.float64)
    if i < n_layers - 1:
      h = h + det_tanh(np.asarray(bottleneck[f"factor{i}"], np.float64)) * det_tanh(h)
  total = (1 << PRECISION) - (2 * z_range + 1)
  cdf = np.rint(det_sigmoid(h[:, 0]) * total).astype(np.int64)
  cdf[:, 0], cdf[:, -1] = 0, total
  cdf = np.minimum(np.maximum.accumulate(cdf, axis=1), total)
  return np.diff(cdf, axis=1)


def _quantize_layer(kernel, bias, in_bits: int, out_bits, weight_bits: int,
                    transpose: bool) -> Layer:
  k = np.asarray(kernel, np.float64)
  cout = k.shape[-1]
  qmax = float((1 << (weight_bits - 1)) - 1)
  amax = np.max(np.abs(k).reshape(-1, cout), axis=0)
  scale = np.where(amax > 0, amax / qmax, 1.0)
  w = np.rint(k / scale).astype(np.int64)
  out_bits = np.broadcast_to(np.asarray(out_bits, np.int64), (cout,))
  real = np.ldexp(scale, (out_bits - in_bits).astype(np.int32))   # output units per acc unit
  f, e = np.frexp(real)
  mult = np.rint(np.ldexp(f, MULT_BITS)).astype(np.int64)        # [2^19, 2^20]
  shift = (MULT_BITS - e).astype(np.int64)
  if shift.min() < 1 or shift.max() > 62:
    raise IntegerModelError(f"hyper-synthesis scale out of range (shift {shift.min()}..{shift.max()})")
  b = np.rint(np.ldexp(np.asarray(bias, np.float64), (out_bits + shift).astype(np.int32)))
  if np.abs(b).max() >= 2.0 ** 61:
    raise IntegerModelError("hyper-synthesis bias too large for int64 requantisation")
  return Layer(w, mult, shift, b.astype(np.int64), transpose)


def _check_bounds(layers, in_max: int) -> None:
  """Prove no accumulator leaves the exact ranges: |acc| < 2^53 (float64 matmul exact) and
  |acc * mult + bias + 2^(shift-1)| < 2^63 (int64 requantisation). Bounds in float64,
  which only overestimate here."""
  a_max = float(in_max)
  for i, l in enumerate(layers):
    acc = np.abs(l.weight).reshape(-1, l.weight.shape[-1]).astype(np.float64).sum(0) * a_max
    total = acc * l.mult + np.abs(l.bias) + np.ldexp(1.0, (l.shift - 1).astype(np.int32))
    if acc.max() >= 2.0 ** 53 or total.max() >= 2.0 ** 62:
      raise IntegerModelError(f"hyper-synthesis layer {i}: integer accumulator bound exceeded "
                              f"(|acc| up to {acc.max():.3g}); lower codec.weight_bits")
    a_max = float(ACT_MAX)


def index_tables(codebook: np.ndarray, logits: Optional[np.ndarray], mix: Optional[float],
                 sigma_range: Optional[Tuple[float, float]]) -> Dict[str, Any]:
  """The index model's integers: codebook [K, D] (float), static logits [K] (nats, or None),
  the static mixture weight (None: no mixture; 1: static only, the hyperprior-off model),
  (sigma_min, sigma_max) (None without a Gaussian). Fields of `BranchTables`."""
  e = np.asarray(codebook, np.float64)
  k_size, dim = e.shape
  if k_size > (1 << 14) or dim > 256:
    raise IntegerModelError(f"codebook {k_size}x{dim} is over the integer path's bounds "
                            "(K <= 16384, D <= 256)")
  total = (1 << PRECISION) - k_size
  emax = float(np.abs(e).max())
  mu_bits = MU_SPAN_BITS - (int(np.frexp(emax)[1]) if emax > 0 else 0)
  code_q = np.rint(np.ldexp(e, mu_bits)).astype(np.int32)
  if logits is None:
    bias = np.zeros(k_size, np.int32)
  else:
    bias = np.clip(np.rint(np.ldexp(np.asarray(logits, np.float64), LOGIT_BITS)),
                   -BIAS_MAX, BIAS_MAX).astype(np.int32)
  eps_q = 0 if mix is None else int(np.rint(np.float64(mix) * (1 << 16)))
  total_static = (total * eps_q) >> 16
  sw = EXP_TABLE[np.minimum(bias.max() - bias.astype(np.int64), EXP_TABLE.size - 1)]
  static = _normalise(sw, total_static).astype(np.int32) if total_static else np.zeros(k_size, np.int32)
  out = dict(mu_bits=mu_bits, codebook=code_q, bias=bias, static=static,
             total_hyper=total - total_static, ls_lo=0, ls_hi=-1,
             inv_mant=np.zeros(0, np.int32), inv_shift=np.zeros(0, np.int32))
  if sigma_range is None:
    return out
  ls_lo = int(np.ceil(det_log(sigma_range[0]) * (1 << LOG_SIGMA_BITS)))
  ls_hi = int(np.floor(det_log(sigma_range[1]) * (1 << LOG_SIGMA_BITS)))
  ls = np.arange(ls_lo, ls_hi + 1, dtype=np.float64)
  inv = np.ldexp(det_exp(-ls / (1 << LOG_SIGMA_BITS)), T_BITS - mu_bits)   # 2^(T-mu)/sigma
  f, x = np.frexp(inv)
  mant = np.rint(np.ldexp(f, 15)).astype(np.int64)                        # [2^14, 2^15]
  x = x + (mant >> 15)
  mant = np.where(mant >> 15, 1 << 14, mant)
  shift = 15 - x
  mant = np.where(shift < 0, (1 << 15) - 1, mant)   # sigma below the mu grid: t saturates
  out.update(ls_lo=ls_lo, ls_hi=ls_hi, inv_mant=mant.astype(np.int32),
             inv_shift=np.clip(shift, 0, 30).astype(np.int32))
  return out


def build_branch(params: Dict[str, Any], codebook: np.ndarray, hyper_on: bool, model_cfg,
                 codec_cfg, ctx_bits: Optional[int] = None) -> BranchTables:
  """One branch's integer tables from its float params (the `hyper_{k}` or `static_{k}`
  subtree) and its codebook entries (float64, as the model uses them). `ctx_bits`: the
  model-wide context scale (`context_bits` of all its codebooks; default: this one's)."""
  h = model_cfg.hyperprior
  raw = params.get("index_bias")
  logits = None if raw is None else np.asarray(raw, np.float64) * float(h.index_bias_scale)
  if not hyper_on:
    return BranchTables(None, (), **index_tables(codebook, logits, 1.0, None))
  mix = float(det_sigmoid(np.asarray(params["mix_logit"], np.float64))) if "mix_logit" in params else None
  idx = index_tables(codebook, logits, mix, (h.sigma_min, h.sigma_max))
  r = int(codec_cfg["z_range"])
  wbits = int(codec_cfg["weight_bits"])
  layers, context, spatial, ctx_entries, in_bits = [], (), (), None, 0
  if h.context == "coarser" or h.spatial != "none":
    # Entries and masks of the contexts in units 2^-ctx_bits (one scale per model).
    ctx_bits = context_bits([codebook]) if ctx_bits is None else int(ctx_bits)
    ctx_entries = np.rint(np.ldexp(np.asarray(codebook, np.float64), ctx_bits)).astype(np.int64)
    ctx_max = max(int(np.abs(ctx_entries).max()), 1 << ctx_bits)
  if h.spatial != "none":
    spatial = tuple(_quantize_layer(params[n]["kernel"], params[n]["bias"], b, ACT_BITS, wbits, False)
                    for n, b in (("spatial_context_in", ctx_bits),
                                 ("spatial_context_full", ACT_BITS)))
    _check_bounds(spatial, ctx_max)
  if h.context == "coarser":
    # The context has its own part of the first layer, requantised apart from z_hat's
    # part and added: each input keeps its own scale.
    k = np.asarray(params["synthesis_up0"]["kernel"])
    cz = int(h.latent_channels)
    context = (_quantize_layer(k[:, :, cz:], np.zeros(k.shape[-1]), ctx_bits, ACT_BITS, wbits, True),
               *(_quantize_layer(params[n]["kernel"], params[n]["bias"], b, ACT_BITS, wbits, False)
                 for n, b in (("context_in", ctx_bits), ("context_full", ACT_BITS))))
    _check_bounds(context[:1], ctx_max)
    _check_bounds(context[1:], ctx_max)
  for i in range(h.num_down):
    p = params[f"synthesis_up{i}"]
    kern = p["kernel"] if not (context and i == 0) else np.asarray(p["kernel"])[:, :, :int(h.latent_channels)]
    layers.append(_quantize_layer(kern, p["bias"], in_bits, ACT_BITS, wbits, True))
    in_bits = ACT_BITS
  p = params["synthesis_out"]
  dim = np.asarray(codebook).shape[1]
  layers.append(_quantize_layer(p["kernel"], p["bias"], in_bits,
                                [idx["mu_bits"]] * dim + [LOG_SIGMA_BITS] * dim, wbits, False))
  _check_bounds(layers, r)
  return BranchTables(z_weights(params["bottleneck"], r), tuple(layers), **idx,
                      context=context, ctx_entries=ctx_entries,
                      ctx_bits=ctx_bits if ctx_entries is not None else 0, spatial=spatial)


def context_bits(codebooks) -> int:
  """The context's fixed-point scale for a model (hyperprior.context): the largest entry of
  any of its codebooks at 2^9..2^10 units, between ACT_BITS and 20 bits (entries at
  taming's 1/K init would otherwise round to 0 and +-1)."""
  emax = max(float(np.abs(np.asarray(e, np.float64)).max()) for e in codebooks)
  e = int(np.frexp(emax)[1]) if emax > 0 else 0
  return int(min(max(MU_SPAN_BITS - e, ACT_BITS), 20))


def digest(tables: Dict[str, BranchTables]) -> bytes:
  """8 bytes of sha256 over every integer of every branch (with the format constants)."""
  hsh = hashlib.sha256(f"hvq-integer-v{VERSION}".encode())
  for key in sorted(tables):
    for name, a in sorted(tables[key].arrays().items()):
      hsh.update(f"{key}.{name}".encode())
      hsh.update(np.ascontiguousarray(a, np.int64).tobytes())
  return hsh.digest()[:8]


# ---- integer hyper-synthesis -----------------------------------------------------------------
def _correlate(x: np.ndarray, taps, h: int, w: int) -> np.ndarray:
  """sum over taps (dy, dx, W [cin, cout]) of x[dy:dy+h, dx:dx+w] @ W, x int64 [H, W, Cin]:
  float64 matmuls of integers whose partial sums stay below 2^53 (_check_bounds), so the
  result is exact whatever order or FMAs BLAS uses."""
  xf = x.astype(np.float64)
  acc = None
  for dy, dx, wt in taps:
    part = xf[dy:dy + h, dx:dx + w].reshape(h * w, -1) @ wt
    acc = part if acc is None else acc + part
  return acc.reshape(h, w, -1).astype(np.int64)


def _conv(x: np.ndarray, l: Layer) -> np.ndarray:
  """flax Conv('SAME', stride 1), or ConvTranspose(stride 2, 'SAME') as four sub-pixel
  convolutions of the undilated input (lax.conv_transpose zero-dilates the input, pads it
  (a, k - a) with a = ceil(k / 2) and correlates; output pixel 2p + r then sees input
  p + (r + t - a) / 2 through the taps t with r + t - a even)."""
  k = l.weight.shape[0]
  wf = l.weight.astype(np.float64)
  h, w, _ = x.shape
  if not l.transpose:
    p = (k - 1) // 2
    xp = np.pad(x, ((p, k - 1 - p), (p, k - 1 - p), (0, 0)))
    return _correlate(xp, [(i, j, wf[i, j]) for i in range(k) for j in range(k)], h, w)
  a = k - 1 if 2 > k - 1 else -(-k // 2)
  xp = np.pad(x, ((k, k), (k, k), (0, 0)))
  out = np.empty((2 * h, 2 * w, wf.shape[-1]), np.int64)
  for ry in (0, 1):
    ty = [t for t in range(k) if (ry + t - a) % 2 == 0]
    for rx in (0, 1):
      tx = [t for t in range(k) if (rx + t - a) % 2 == 0]
      taps = [(k + (ry + i - a) // 2, k + (rx + j - a) // 2, wf[i, j]) for i in ty for j in tx]
      out[ry::2, rx::2] = _correlate(xp, taps, h, w)
  return out


def _layer(x: np.ndarray, l: Layer) -> np.ndarray:
  acc = _conv(x, l)
  return (acc * l.mult + l.bias + (np.int64(1) << (l.shift - 1))) >> l.shift


def _gelu(x: np.ndarray) -> np.ndarray:
  lim = GELU_RANGE << ACT_BITS
  g = GELU_TABLE[np.clip(x, -lim, lim) + lim].astype(np.int64)
  return np.clip(np.where(x > lim, x, np.where(x < -lim, 0, g)), -ACT_MAX, ACT_MAX)


def context_map(g: str, masks: Dict[str, np.ndarray], indices: Dict[str, np.ndarray],
                entries: Dict[str, np.ndarray], strides, ctx_bits: int) -> np.ndarray:
  """hyperprior.context='coarser': what granularity g's prior reads (`layout.prior_context`),
  int64 [h_g, w_g, 3 (D + 1)] in units 2^-ctx_bits. masks {g: bool [h, w]}, indices
  {g: int [h, w]} (the coarser ones decoded; a granularity with no sent position has no
  stream and may be missing), entries {g: int64 [K, D]} (`BranchTables.ctx_entries`)."""
  from hvq_jax import layout
  gi = layout.GRANULARITIES.index(g)
  looked_up = {o: entries[o][np.asarray(indices[o], np.int64) if o in indices
                             else np.zeros(masks[o].shape, np.int64)]
               for o in layout.GRANULARITIES[:gi]}
  return layout.prior_context(g, masks, looked_up, strides, entries[g].shape[1],
                              np.int64(1 << ctx_bits))


def _pool(ctx: np.ndarray, f: int, hz: int, wz: int) -> np.ndarray:
  """Mean over f x f blocks (zero-padded to hz f x wz f), rounded: int64 [hz, wz, C]."""
  c = np.pad(ctx, ((0, hz * f - ctx.shape[0]), (0, wz * f - ctx.shape[1]), (0, 0)))
  s = c.reshape(hz, f, wz, f, -1).sum(axis=(1, 3))
  sh = 2 * (f.bit_length() - 1)
  return (s + (np.int64(1) << (sh - 1) if sh else 0)) >> sh


def spatial_map(g_entries: np.ndarray, indices: np.ndarray, mask: np.ndarray,
                passes: np.ndarray, p: int, ctx_bits: int) -> np.ndarray:
  """hyperprior.spatial: what pass p of a granularity's prior reads
  (`layout.spatial_context`), int64 [h, w, D + 1] in units 2^-ctx_bits. g_entries int64
  [K, D] (`BranchTables.ctx_entries`), indices int [h, w] (those of passes < p decoded;
  anything elsewhere), mask bool [h, w] (sent at this granularity), passes [h, w]
  (`layout.pass_map`)."""
  from hvq_jax import layout
  e = g_entries[np.asarray(indices, np.int64)]
  return layout.spatial_context(e, np.asarray(mask, bool), passes, p, np.int64(1 << ctx_bits))


def features(t: BranchTables, z_hat: np.ndarray, grid_hw,
             ctx: Optional[np.ndarray] = None) -> np.ndarray:
  """The float `HyperBranch.features`: integer z_hat [h_z, w_z, C] (and the coarser
  context `ctx`, `context_map`) -> what the last layer reads, int64 activations in units
  2^-ACT_BITS (before its clip), on y's grid with a context or a spatial context."""
  a = np.asarray(z_hat, np.int64)
  if t.context:
    if ctx is None:
      raise IntegerModelError("this branch's prior reads a context map; none was given")
    f = 1 << (len(t.layers) - 1)
    a = _gelu(_layer(a, t.layers[0]) + _layer(_pool(ctx, f, a.shape[0], a.shape[1]), t.context[0]))
    for l in t.layers[1:-1]:
      a = _gelu(_layer(a, l))
  else:
    for l in t.layers[:-1]:
      a = _gelu(_layer(a, l))
  if t.context or t.spatial:   # the float HyperBranch: crop, add the context convs
    a = a[:grid_hw[0], :grid_hw[1]]
  if t.context:
    a = a + _layer(_gelu(_layer(ctx, t.context[1])), t.context[2])
  return a


def head(t: BranchTables, a: np.ndarray, grid_hw,
         spatial: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
  """`features` (+ the spatial convs of one pass's `spatial_map`) -> (mu int32 [h, w, D]
  in units 2^-mu_bits, log-sigma index int32 [h, w, D] in units 2^-8, clipped to the
  model's sigma range) on y's grid. Each term is below 2^61 (the layers' requantisation
  bound), so their int64 sum is exact; it is clipped to the activation range once."""
  if spatial is not None:
    if not t.spatial:
      raise IntegerModelError("this branch's prior has no spatial context")
    a = a + _layer(_gelu(_layer(spatial, t.spatial[0])), t.spatial[1])
  out = _layer(np.clip(a, -ACT_MAX, ACT_MAX), t.layers[-1])[:grid_hw[0], :grid_hw[1]]
  d = out.shape[-1] // 2
  lim = 1 << 14                                      # |e - mu| < 2^15
  mu = np.clip(out[..., :d], -lim, lim)
  ls = np.clip(out[..., d:], t.ls_lo, t.ls_hi)
  return mu.astype(np.int32), ls.astype(np.int32)


def synthesis(t: BranchTables, z_hat: np.ndarray, grid_hw, ctx: Optional[np.ndarray] = None,
              spatial: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Integer z_hat [h_z, w_z, C] -> (mu, log-sigma index) on y's grid (`head`). A context
  model also needs `ctx` (`context_map`); a pass p > 0 of a spatial model its
  `spatial_map` (pass 0: None)."""
  return head(t, features(t, z_hat, grid_hw, ctx), grid_hw, spatial)


# ---- index frequencies -------------------------------------------------------------------------
def index_weights(mu, ls, codebook, inv_mant, inv_shift, bias, static, exp_table, ls_lo: int,
                  total_hyper: int, xp=np):
  """Integer weights [n, K] (row sums 2^24 - K) of every index at n positions from
  mu [n, D] and log-sigma indices ls [n, D] (int32; the tables as `BranchTables` holds
  them, `exp_table` = EXP_TABLE). `xp` is numpy or jax.numpy: every intermediate is int32
  and bounded as noted, so both give the same integers on any device.

  Gaussian logits -1/2 sum_d ((e_kd - mu_d) / sigma_d)^2 + bias_k in units 2^-8 nats,
  weights 2^15 exp(logit - max) from the table, scaled to `total_hyper`, plus the static
  share (the mixture); the rounding shortfall goes to the most likely entry.
  """
  i32 = xp.int32
  j = ls - ls_lo
  m = xp.take(inv_mant, j)                                   # [n, D] in [2^14, 2^15]
  s = xp.take(inv_shift, j)                                  # [n, D] in [0, 30]
  diff = codebook[None, :, :] - mu[:, None, :]               # [n, K, D], |.| < 2^15
  half = xp.right_shift(xp.left_shift(xp.ones_like(s), s), 1)
  t = xp.right_shift(diff * m[:, None, :] + half[:, None, :], s[:, None, :])   # |.| < 2^31
  t = xp.clip(t, -T_MAX, T_MAX)                              # t^2 <= 2^22, sum <= 2^30
  q = xp.right_shift(xp.sum(t * t, axis=-1, dtype=i32), 2 * T_BITS + 1 - LOGIT_BITS)
  logit = bias[None, :] - q
  delta = xp.max(logit, axis=1, keepdims=True) - logit       # >= 0
  w = xp.take(exp_table, xp.minimum(delta, exp_table.shape[0] - 1))   # [n, K], <= 2^15
  tot = xp.sum(w, axis=1, dtype=i32)                         # in [2^15, 2^29] (K <= 2^14)
  # floor(w * total_hyper / tot) without 64-bit products: total_hyper = qq tot + rem and
  # frac = floor(rem 2^16 / tot) by long division; w qq <= total_hyper < 2^24 (w <= tot),
  # w frac < 2^31. Each term is at most the exact quotient, so the shortfall is >= 0.
  qq = total_hyper // tot
  rem = total_hyper - qq * tot
  frac = xp.zeros_like(rem)
  for _ in range(16):
    rem = rem * 2                                            # < 2^30
    bit = (rem >= tot).astype(i32)
    frac = frac * 2 + bit
    rem = rem - bit * tot
  v = w * qq[:, None] + xp.right_shift(w * frac[:, None], 16) + static[None, :]
  k = codebook.shape[0]
  short = ((1 << PRECISION) - k) - xp.sum(v, axis=1, dtype=i32)
  top = xp.argmax(w, axis=1)
  return v + (xp.arange(k)[None, :] == top[:, None]).astype(i32) * short[:, None]


def branch_index_weights(t: BranchTables, mu, ls, chunk: int = 2048) -> np.ndarray:
  """index_weights in numpy for one branch, `chunk` positions at a time: int32 [n, K]."""
  out = np.empty((len(mu), t.codebook.shape[0]), np.int32)
  for s in range(0, len(mu), chunk):
    out[s:s + chunk] = index_weights(
        np.asarray(mu[s:s + chunk], np.int32), np.asarray(ls[s:s + chunk], np.int32),
        t.codebook, t.inv_mant, t.inv_shift, t.bias, t.static, EXP_TABLE, t.ls_lo,
        t.total_hyper)
  return out


def code_lengths(weights: np.ndarray, symbols: np.ndarray) -> np.ndarray:
  """Exact bits of each symbol under integer weights (frequency w + 1 of 2^24)."""
  w = np.asarray(weights)[np.arange(len(symbols)), symbols].astype(np.float64)
  return PRECISION - np.log2(w + 1.0)
