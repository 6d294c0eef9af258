"""Image quality metrics on uint8-range images (PSNR, SSIM, MS-SSIM), in numpy/scipy.

MS-SSIM follows Wang et al. 2003 with the usual 11x11 Gaussian (sigma 1.5), K=(0.01,
0.03), 5 scales and weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average
pooling between scales, on each RGB channel, averaged (the CompressAI/pytorch-msssim
convention; 'ms-ssim-rgb').
"""
import numpy as np
from scipy import ndimage

MS_SSIM_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def _gauss_filter(x):
  # scipy's gaussian_filter with truncate chosen so the kernel is 11 taps (radius 5).
  return ndimage.gaussian_filter(x, 1.5, truncate=5 / 1.5, mode="constant")


def _ssim_parts(x, y, peak):
  """Mean SSIM and mean contrast-structure term of 2-D float64 images (valid region)."""
  c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
  mx, my = _gauss_filter(x), _gauss_filter(y)
  sxx = _gauss_filter(x * x) - mx * mx
  syy = _gauss_filter(y * y) - my * my
  sxy = _gauss_filter(x * y) - mx * my
  cs = (2 * sxy + c2) / (sxx + syy + c2)
  lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
  crop = (slice(5, -5), slice(5, -5))  # keep only windows fully inside the image
  return float(np.mean((lum * cs)[crop])), float(np.mean(cs[crop]))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  """Single-scale SSIM of two [H, W, 3] (or [H, W]) images, averaged over channels."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  return float(np.mean([_ssim_parts(a[..., c], b[..., c], peak)[0] for c in range(a.shape[-1])]))


MS_SSIM_MIN_SIZE = 161   # 5 scales of an 11-tap window: (11 - 1) * 2**4 + 1


def ms_ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
  """MS-SSIM of two [H, W, 3] (or [H, W]) images; needs min(H, W) > 160."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if min(a.shape[:2]) < MS_SSIM_MIN_SIZE:
    raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE}, "
                     f"got {a.shape[:2]}")
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  vals = []
  for c in range(a.shape[-1]):
    x, y = a[..., c], b[..., c]
    mcs = []
    for scale in range(5):
      s, cs = _ssim_parts(x, y, peak)
      if scale < 4:
        mcs.append(max(cs, 0.0))
        h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    vals.append(np.prod(np.array(mcs) ** MS_SSIM_WEIGHTS[:4]) * max(s, 0.0) ** MS_SSIM_WEIGHTS[4])
  return float(np.mean(vals))


def color_shift(a: np.ndarray, b: np.ndarray) -> float:
  """Mean absolute shift of the per-channel means (0-255 units): a hue or saturation
  drift that PSNR barely sees (grass decoding grey-beige)."""
  ma = np.asarray(a, np.float64).reshape(-1, 3).mean(0)
  mb = np.asarray(b, np.float64).reshape(-1, 3).mean(0)
  return float(np.abs(ma - mb).mean())


def ciede2000(a: np.ndarray, b: np.ndarray) -> float:
  """Mean CIEDE2000 colour difference (scikit-image, sRGB -> CIELAB D65)."""
  from skimage import color
  la = color.rgb2lab(np.asarray(a, np.uint8))
  lb = color.rgb2lab(np.asarray(b, np.uint8))
  return float(color.deltaE_ciede2000(la, lb).mean())
