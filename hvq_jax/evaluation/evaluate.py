"""`hvq eval`: real files, real metrics, baselines and the hyperprior-vs-static ablation.

For every image and rate setting the image is compressed to a real .hvq file and
decoded; bpp is 8 * file bytes / pixels. The same indices are also priced by a static
histogram fitted on the training images (Control-GIC's scheme; `static_prior.py`), as an
ideal arithmetic code and as a Huffman code, and at log2(K) bits each (fixed length),
all with the same container overhead and
granularity-map code as our file, so the only difference is how the indices (and, for
us, z) are coded. DISTS is per image (`perceptual.py`); FID/KID are per method and
setting over 256x256 patches of the whole set (`fidelity.py`). Outputs: `results.csv`
(one row per image, method and setting), `fid_kid.csv` (one row per method and setting)
and `summary.json` (per-setting means, the hyperprior's saving, BD-rates, published
curves of the same dataset).
"""
import csv
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from hvq_jax.evaluation import baselines
from hvq_jax.evaluation import fidelity
from hvq_jax.evaluation import perceptual
from hvq_jax.evaluation import published as published_lib
from hvq_jax.entropy import bitstream
from hvq_jax import codec
from hvq_jax.codec import profile
from hvq_jax.evaluation import metrics
from hvq_jax.evaluation import static_prior
from hvq_jax import images as images_lib

FIELDS = ("image", "method", "setting", "lmbda", "ratios", "quality", "bytes", "bpp", "psnr",
          "ms_ssim", "lpips", "dists", "color_shift", "ciede2000", "bits_hyperprior", "bits_static", "bits_huffman", "bits_fixed",
          "est_bits_y", "est_bits_z", "est_bits_map", "saving_vs_static", "saving_vs_huffman", "saving_vs_fixed")
CONTAINER_BITS = 8 * bitstream.CONTAINER_BYTES


def load_images(spec: str, tfds_data_dir: str = "", limit: int = 0) -> Dict[str, np.ndarray]:
  """`bundled:heldout` | `bundled:train` | a folder | `tfds:NAME[:SPLIT]` -> {name: uint8}."""
  if spec.startswith("bundled:"):
    out = images_lib.bundled_photos(spec.split(":", 1)[1])
  elif spec.startswith("tfds:"):
    parts = spec.split(":")
    src = images_lib.TfdsImages(parts[1], parts[2] if len(parts) > 2 else "test", tfds_data_dir)
    n = len(src) if not limit else min(limit, len(src))
    out = {f"{parts[1]}_{i:05d}": src[i] for i in range(n)}
  else:
    out = {os.path.splitext(os.path.basename(p))[0]: images_lib.read_image(p)
           for p in images_lib.list_images(spec)}
  if limit:
    out = dict(list(out.items())[:limit])
  return out


class LpipsMetric:
  """LPIPS when its weights can be found; otherwise None values and the reason."""

  def __init__(self, net: str = "alexnet", weights_dir: Optional[str] = None):
    from hvq_jax.nn import lpips as lpips_lib
    self.reason = None
    try:
      self.params = lpips_lib.load_params(net, weights_dir)
    except lpips_lib.WeightsError as e:
      self.params, self.reason = None, str(e)
      return
    import jax
    module = lpips_lib.LPIPS(net)
    self._fn = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))
    self.net = net

  def __call__(self, a: np.ndarray, b: np.ndarray) -> Optional[float]:
    if self.params is None:
      return None
    to = lambda x: np.asarray(x, np.float32)[None] / 127.5 - 1.0
    return float(self._fn(self.params, to(a), to(b))[0])


def _quality(orig, rec, lp, ds=None) -> Dict[str, Optional[float]]:
  try:
    ms = metrics.ms_ssim(orig, rec)
  except ValueError:
    ms = None  # smaller than MS-SSIM's 5 scales allow
  return dict(psnr=metrics.psnr(orig, rec), ms_ssim=ms, lpips=lp(orig, rec),
              dists=ds(orig, rec) if ds is not None else None,
              color_shift=metrics.color_shift(orig, rec), ciede2000=metrics.ciede2000(orig, rec))


def prior_diagnostics(cmodel, indices, priors) -> Dict[str, np.ndarray]:
  """What limits the hyperprior, per sent index of each branch (float64, from the integer
  prior the file was coded with): the Gaussian's own bits (no static logits, no mixture),
  the RMS per-dimension distance of the chosen entry from mu in units of sigma, mean
  log2 sigma, and whether the chosen entry was the Gaussian's most likely one."""
  out = {}
  for k, (mu_q, ls_q) in priors.items():
    t = cmodel.tables[k]
    e = t.codebook.astype(np.float64) / 2.0 ** t.mu_bits
    mu = mu_q.astype(np.float64) / 2.0 ** t.mu_bits
    sigma = np.exp(ls_q.astype(np.float64) / 256.0)
    idx = np.asarray(indices[k])
    rows = []
    for s in range(0, len(idx), 2048):
      d = (e[None] - mu[s:s + 2048, None]) / sigma[s:s + 2048, None]
      logit = -0.5 * (d * d).sum(-1)
      lse = logit.max(-1) + np.log(np.exp(logit - logit.max(-1, keepdims=True)).sum(-1))
      i = idx[s:s + 2048]
      chosen = logit[np.arange(len(i)), i]
      rows.append(np.stack([(lse - chosen) / np.log(2),
                            np.sqrt(-2 * chosen / e.shape[1]),
                            np.log2(sigma[s:s + 2048]).mean(-1),
                            (logit.argmax(-1) == i).astype(np.float64)], -1))
    out[k] = np.concatenate(rows) if rows else np.zeros((0, 4))
  return out


def parse_settings(lmbdas: Optional[str], ratios: Optional[str], cmodel) -> List[Dict]:
  lams = ([float(v) for v in lmbdas.split(",")] if lmbdas
          else [float(v) for v in cmodel.config.rd.lambdas])
  rats = ([tuple(float(v) for v in r.split(",")) for r in ratios.split(";")] if ratios
          else [cmodel.default_ratios])
  from hvq_jax.nn.model import check_ratios
  for r in rats:
    check_ratios(r)
  return [dict(lmbda=l, ratios=r, name=f"lmbda={l:g} ratios={','.join(f'{v:g}' for v in r)}")
          for r in rats for l in lams]


def run(cmodel, images: Dict[str, np.ndarray], settings: List[Dict], out_dir: str,
        fit_images: Dict[str, np.ndarray], baseline_codecs: Sequence[str] = ("jpeg", "webp", "avif"),
        lpips_net: str = "alexnet", lpips_weights: Optional[str] = None, save_recon: bool = True,
        progress: bool = True, command: str = "", dataset: Optional[str] = None,
        dists: bool = True, dists_alpha_beta: Optional[str] = None, fid_kid: bool = True,
        inception_weights: Optional[str] = None) -> Dict:
  from tqdm import tqdm
  os.makedirs(out_dir, exist_ok=True)
  lp = LpipsMetric(lpips_net, lpips_weights)
  ds = perceptual.DistsMetric(lpips_weights, dists_alpha_beta) if dists else None
  fk, fk_reason = (fidelity.PatchFidelity.create(inception_weights) if fid_kid
                   else (None, "not requested (--no-fid)"))
  rows = []
  t0 = time.time()
  hists = {s["name"]: static_prior.fit_counts(cmodel, fit_images.values(), s["lmbda"], s["ratios"])
           for s in tqdm(settings, desc="fit static histograms", disable=not progress)}
  todo = [(n, s) for n in images for s in settings]
  branch_bits = {}    # branch -> [hyperprior y bits, z bits, static bits, indices]
  diag = {}           # branch -> [gaussian bits, mahalanobis, log2 sigma, mode hit] sums
  pass_bits = {}      # branch -> [[index bits, indices] per spatial pass]
  for name, s in tqdm(todo, desc="hvq", disable=not progress):
    img = images[name]
    hw = img.shape[0] * img.shape[1]
    data, st = profile.compress(cmodel, img, lmbda=s["lmbda"], ratios=s["ratios"])
    rec = codec.decompress(cmodel, data)
    if save_recon:
      from PIL import Image
      os.makedirs(os.path.join(out_dir, "recon"), exist_ok=True)
      Image.fromarray(rec).save(os.path.join(out_dir, "recon", f"{name}__{s['name'].replace(' ', '__')}.png"))
    priced = static_prior.price(st["indices"], hists[s["name"]])
    for k, d in st["branch_bits"].items():
      acc = branch_bits.setdefault(k, np.zeros(4))
      acc += (d["y"], d["z"], priced["per_branch"].get(k, 0.0), d["n"])
    for k, ps in st["pass_bits"].items():
      acc = pass_bits.setdefault(k, np.zeros((len(ps), 2)))
      acc += np.asarray(ps, np.float64)
    for k, v in prior_diagnostics(cmodel, st["indices"], st["priors"]).items():
      diag.setdefault(k, np.zeros(4))[:] += v.sum(0)
    shared = CONTAINER_BITS + st["bits"]["map"]
    hyper = 8 * len(data)
    static_bits, huff_bits = priced["static"] + shared, priced["huffman"] + shared
    n_idx = sum(len(v) for v in st["indices"].values())
    fixed_bits = n_idx * np.log2(cmodel.cfg.codebook_size) + shared
    rows.append(dict(
        image=name, method="hvq", setting=s["name"], lmbda=s["lmbda"],
        ratios=",".join(f"{v:g}" for v in s["ratios"]), quality=None, bytes=len(data),
        bpp=hyper / hw, **_quality(img, rec, lp, ds), bits_hyperprior=hyper, bits_static=static_bits,
        bits_huffman=huff_bits, bits_fixed=fixed_bits,
        est_bits_y=sum(v for k, v in st["bits"].items() if k.startswith("y_")),
        est_bits_z=st["bits"]["z"], est_bits_map=st["bits"]["map"],
        saving_vs_static=1.0 - hyper / static_bits, saving_vs_huffman=1.0 - hyper / huff_bits,
        saving_vs_fixed=1.0 - hyper / fixed_bits))
    if fk is not None:
      fk.add(("hvq", s["name"]), name, img, rec)
  base_todo = [(n, c, q) for n in images for c in baseline_codecs if baselines.available(c)
               for q in baselines.QUALITIES[c]]
  for name, c, q in tqdm(base_todo, desc="baselines", disable=not progress):
    img = images[name]
    data, rec = baselines.encode_decode(img, c, q)
    rows.append(dict(image=name, method=c, setting=f"q={q}", quality=q, bytes=len(data),
                     bpp=8 * len(data) / (img.shape[0] * img.shape[1]), **_quality(img, rec, lp, ds)))
    if fk is not None:
      fk.add((c, f"q={q}"), name, img, rec)
  write_csv(rows, os.path.join(out_dir, "results.csv"))
  setting_metrics = fk.results() if fk is not None else {}
  write_csv(fidelity.summary_rows(setting_metrics), os.path.join(out_dir, "fid_kid.csv"),
            FID_KID_FIELDS)
  summary = summarize(rows, setting_metrics)
  dataset = published_lib.normalise(dataset)
  bd_pub, bd_pub_missing = published_lib.bd_rates(summary["curves"].get("hvq", []), dataset,
                                                  lpips_net if lp.params is not None else None)
  summary.update(
      # which streams the hyperprior wins or loses on (granularities; residual-VQ stages)
      per_branch_bits_per_index={
          k: dict(indices=int(n), hyperprior_y=y / n, z=z / n, static=st_ / n,
                  saving_vs_static=1.0 - (y + z) / st_,
                  **({} if len(pass_bits.get(k, ())) < 2 else dict(
                      passes_y=[b / max(m, 1) for b, m in pass_bits[k]])),
                  **({} if k not in diag else dict(
                      gaussian_y=diag[k][0] / n, chosen_mahalanobis_rms=diag[k][1] / n,
                      log2_sigma=diag[k][2] / n, chosen_is_mode=diag[k][3] / n)))
          for k, (y, z, st_, n) in branch_bits.items() if n},
      per_branch_note=("bits per sent index: hyperprior_y (the file's index bits), z, static "
                       "(histogram fitted on the training photos); gaussian_y: the Gaussian "
                       "alone, without the static logits and mixture; chosen_mahalanobis_rms: "
                       "RMS per-dimension |e_k* - mu| / sigma; log2_sigma: mean over dims; "
                       "chosen_is_mode: the chosen entry was the Gaussian's most likely; "
                       "passes_y (hyperprior.spatial): index bits per index of each pass"),
      command=command, seconds=time.time() - t0, images=list(images),
      checkpoint_fingerprint=cmodel.fingerprint.hex(),
      static_histogram_fit_on=list(fit_images),
      lpips=dict(net=lpips_net, available=lp.params is not None, missing_reason=lp.reason),
      dists=dict(available=ds is not None and ds.available,
                 missing_reason=None if ds is None else ds.reason,
                 computed_on="full-size images (as MS-ILLM and DiffEIC)") if dists
      else dict(available=False, missing_reason="not requested (--no-dists)"),
      fid_kid=dict(available=fk is not None, missing_reason=fk_reason, scheme=fidelity.SCHEME,
                   patches=max([r["patches"] for r in setting_metrics.values()], default=0),
                   kid_subset_size=max([r.get("kid_subset_size") or 0
                                        for r in setting_metrics.values()], default=0) or None),
      baselines_unavailable=[c for c in baseline_codecs if not baselines.available(c)],
      dataset=dataset,
      bd_rate_vs_published_percent=bd_pub, bd_rate_vs_published_not_computed=bd_pub_missing,
      published=published_lib.for_dataset(dataset),
      published_note=published_lib.note(dataset))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=_jsonable)
  return summary


def _jsonable(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  raise TypeError(type(v))


FID_KID_FIELDS = ("method", "setting", "fid", "kid", "kid_std", "kid_subset_size", "patches", "images")


def write_csv(rows: List[Dict], path: str, fields: Sequence[str] = FIELDS) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
  os.replace(tmp, path)


def read_csv(path: str) -> List[Dict]:
  def conv(v):
    if v == "":
      return None
    try:
      return float(v)
    except ValueError:
      return v
  with open(path) as f:
    return [{k: (v if k in ("image", "method", "setting", "ratios") else conv(v))
             for k, v in r.items()} for r in csv.DictReader(f)]


def _mean(vals):
  vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return float(np.mean(vals)) if vals else None


def read_fid_kid(path: str) -> Dict:
  """fid_kid.csv -> {(method, setting): {fid, kid, ...}} ({} when absent)."""
  if not os.path.isfile(path):
    return {}
  return {(r["method"], r["setting"]): r for r in read_csv(path)}


def curves(rows: List[Dict], setting_metrics: Optional[Dict] = None) -> Dict[str, List[Dict]]:
  """{method: [per-setting means of bpp, psnr, ms_ssim, lpips, dists, ...; fid/kid of the
  setting's patches]} sorted by bpp."""
  setting_metrics = setting_metrics or {}
  out = {}
  for m in dict.fromkeys(r["method"] for r in rows):
    pts = []
    for s in dict.fromkeys(r["setting"] for r in rows if r["method"] == m):
      rs = [r for r in rows if r["method"] == m and r["setting"] == s]
      pts.append(dict(setting=s, **{k: _mean([r.get(k) for r in rs])
                                    for k in ("bpp", "psnr", "ms_ssim", "lpips", "dists",
                                              "color_shift", "ciede2000")},
                      **{k: setting_metrics.get((m, s), {}).get(k)
                         for k in ("fid", "kid", "kid_std", "patches")}))
    out[m] = sorted(pts, key=lambda p: p["bpp"])
  return out


def summarize(rows: List[Dict], setting_metrics: Optional[Dict] = None) -> Dict:
  from hvq_jax.evaluation.bd_rate import bd_rate
  ours = [r for r in rows if r["method"] == "hvq"]
  per_image = {}
  for r in ours:
    per_image.setdefault(r["image"], []).append(r)
  saving_img = {n: 1.0 - sum(r["bits_hyperprior"] for r in rs) / sum(r["bits_static"] for r in rs)
                for n, rs in per_image.items()}
  huff_img = {n: 1.0 - sum(r["bits_hyperprior"] for r in rs) / sum(r["bits_huffman"] for r in rs)
              for n, rs in per_image.items()}
  cv = curves(rows, setting_metrics)
  bd, bd_missing = {}, {}
  for m in cv:
    if m == "hvq":
      continue
    for metric in published_lib.BD_METRICS:
      a = [(p["bpp"], p[metric]) for p in cv[m] if p[metric] is not None]
      b = [(p["bpp"], p[metric]) for p in cv["hvq"] if p[metric] is not None] if "hvq" in cv else []
      try:
        bd[f"hvq_vs_{m}_{metric}"] = bd_rate(*zip(*a), *zip(*b))
      except (ValueError, TypeError) as e:
        bd[f"hvq_vs_{m}_{metric}"] = None
        bd_missing[f"hvq_vs_{m}_{metric}"] = str(e)
  return dict(
      hyperprior_saving_vs_static=_mean([r["saving_vs_static"] for r in ours]),
      hyperprior_saving_vs_huffman=_mean([r["saving_vs_huffman"] for r in ours]),
      hyperprior_saving_vs_fixed_length=_mean([r["saving_vs_fixed"] for r in ours]),
      static_saving_vs_fixed_length=_mean([1 - r["bits_static"] / r["bits_fixed"] for r in ours]),
      huffman_saving_vs_fixed_length=_mean([1 - r["bits_huffman"] / r["bits_fixed"] for r in ours]),
      saving_vs_static_per_image=saving_img, saving_vs_huffman_per_image=huff_img,
      saving_vs_static_per_setting={s: _mean([r["saving_vs_static"] for r in ours if r["setting"] == s])
                                    for s in dict.fromkeys(r["setting"] for r in ours)},
      bits_breakdown_mean=dict(
          file=_mean([r["bits_hyperprior"] for r in ours]), y=_mean([r["est_bits_y"] for r in ours]),
          z=_mean([r["est_bits_z"] for r in ours]), map=_mean([r["est_bits_map"] for r in ours]),
          container=CONTAINER_BITS, static_indices_and_map=_mean([r["bits_static"] for r in ours])),
      curves=cv, bd_rate_percent=bd, bd_rate_not_computed=bd_missing,
      bd_rate_note="percent rate change of hvq against each baseline at equal metric "
                   "(negative: hvq needs fewer bits; for LPIPS/DISTS, lower is better and the "
                   "sign means the same); pchip, over the shared metric range")
