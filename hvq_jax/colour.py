"""The colour transform a file carries: an affine map of RGB the encoder fits, every decoder applies.

A small codec at a low rate pulls colours toward grey (on the corpus's 16 held-out photos
the tiny staged model's decoded means sat 5-7/255 off per channel, greens the most). The
encoder, which decodes its own file anyway to know what the decoder will show, fits

  rgb_out = rgb_decoded @ G + o      (G 3x3, o 3, per image, least squares)

to the original and sends G and o in 24 bytes (int16: G in 1/4096, o in 1/16 of a pixel
level); the decoder applies them to its uint8 output (docs/codec.md, format 4). AV1's loop
restoration and JPEG XL's colour transforms send fitted filter parameters the same way.

Framework-free numpy in integers, applied on the host by every decoder (JAX and PyTorch
alike): the same uint8 in gives the same uint8 out on every machine.
"""
import numpy as np

GAIN_SCALE = 4096        # G in 1/4096: a gain step moves a level-255 pixel by 1/16
OFFSET_SCALE = 16        # o in 1/16 of a level
WORDS = 12               # int16 words in the file: G row-major (input channel, output), then o
IDENTITY = tuple(int(v) for v in np.concatenate([np.eye(3).reshape(-1) * GAIN_SCALE,
                                                 np.zeros(3)]))
# The fit is pulled toward the identity with this weight per pixel (in level^2): a flat or
# one-coloured image, whose least squares is singular, keeps G near 1 instead of blowing up.
RIDGE = 1e-4 * 255.0 ** 2
_CHUNK = 1 << 20         # pixels per step: bounded memory at any image size


def _rows(img: np.ndarray) -> np.ndarray:
  return np.asarray(img, np.uint8).reshape(-1, 3)


def fit(decoded: np.ndarray, original: np.ndarray) -> tuple:
  """uint8 [H, W, 3] decoded and original images -> the 12 int16 words of the transform
  (ridge least squares toward the identity, quantised, clipped to int16; the identity
  where the quantised map would not lower the squared error)."""
  d, o = _rows(decoded), _rows(original)
  if d.shape != o.shape:
    raise ValueError(f"decoded {np.shape(decoded)} and original {np.shape(original)} differ in size")
  xtx, xty = np.zeros((4, 4)), np.zeros((4, 3))
  for i in range(0, len(d), _CHUNK):
    x = np.concatenate([d[i:i + _CHUNK].astype(np.float64), np.ones((len(d[i:i + _CHUNK]), 1))], 1)
    xtx += x.T @ x
    xty += x.T @ o[i:i + _CHUNK].astype(np.float64)
  eye = np.concatenate([np.eye(3), np.zeros((1, 3))])   # the identity map: G = 1, o = 0
  reg = RIDGE * len(d) * np.diag([1.0, 1.0, 1.0, 0.0])   # the offset is not pulled
  w = np.linalg.solve(xtx + reg + 1e-9 * np.eye(4), xty + reg @ eye)
  g = np.clip(np.rint(w[:3] * GAIN_SCALE), -32768, 32767)
  # the offsets refitted to the gains as quantised and clipped (a clipped gain with the
  # offset of the unclipped one could be hundreds of levels off)
  mean_d, mean_o = xtx[3, :3] / len(d), xty[3] / len(d)
  o = np.clip(np.rint((mean_o - mean_d @ (g / GAIN_SCALE)) * OFFSET_SCALE), -32768, 32767)
  words = tuple(int(v) for v in np.concatenate([g.reshape(-1), o]))
  # never worse than sending nothing (clipping can make it so on degenerate images)
  if _sq_error(apply(decoded, words), original) >= _sq_error(decoded, original):
    return IDENTITY
  return words


def _sq_error(a: np.ndarray, b: np.ndarray) -> int:
  a, b = _rows(a), _rows(b)
  return sum(int(np.sum((a[i:i + _CHUNK].astype(np.int64) - b[i:i + _CHUNK]) ** 2))
             for i in range(0, len(a), _CHUNK))


def bound(words, levels: int = 1) -> int:
  """How far two decoders' outputs may differ after the transform when their networks'
  uint8 outputs differ by at most `levels`: ceil(levels * the largest column sum of |G|)
  (at least `levels`; None, a file before format 4: `levels`)."""
  if words is None:
    return levels
  g = np.abs(np.asarray(words[:9], np.int64).reshape(3, 3)).sum(0).max()
  return max(levels, int(-(-levels * int(g) // GAIN_SCALE)))


def apply(decoded: np.ndarray, words) -> np.ndarray:
  """uint8 [H, W, 3] and the 12 words -> uint8 [H, W, 3]: in integers (at most 3 * 255 *
  32767 + 2^23 in magnitude, exact in int64), rounded half up, clipped."""
  words = tuple(int(v) for v in words)
  if words == IDENTITY:
    return np.asarray(decoded, np.uint8)
  g = np.asarray(words[:9], np.int64).reshape(3, 3)
  o = np.asarray(words[9:], np.int64) * (GAIN_SCALE // OFFSET_SCALE)
  d = _rows(decoded)
  out = np.empty_like(d)
  for i in range(0, len(d), _CHUNK):
    y = (d[i:i + _CHUNK].astype(np.int64) @ g + o + GAIN_SCALE // 2) // GAIN_SCALE
    out[i:i + _CHUNK] = np.clip(y, 0, 255).astype(np.uint8)
  return out.reshape(np.shape(decoded))
