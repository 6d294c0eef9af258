"""Published reference curves: provenance, spot values typed from the sources, which
curves may sit beside ours (same dataset, same LPIPS backbone), BD-rate signs for
lower-is-better metrics, and the RD plots drawing only same-dataset curves."""
import csv
import glob
import json
import os
import re

import numpy as np
import pytest

from hvq_jax.evaluation import baselines
from hvq_jax.evaluation import bd_rate
from hvq_jax.evaluation import evaluate
from hvq_jax.evaluation import plots
from hvq_jax.evaluation import published

METRICS = {"bpp", "psnr", "ms_ssim", "lpips", "dists", "fid", "kid"}
RANGES = dict(bpp=(0.005, 4), psnr=(10, 50), ms_ssim=(0.1, 1), lpips=(0, 1), dists=(0, 1),
              fid=(0, 200), kid=(-0.01, 0.1))


def _by(method, dataset):
  (e,) = [e for e in baselines.published() if e["method"] == method and e["dataset"] == dataset]
  return e


def test_every_file_has_provenance_and_sane_points():
  files = sorted(glob.glob(os.path.join(baselines.REFERENCE_DIR, "*.json")))
  assert len(files) >= 12
  for path in files:
    with open(path) as f:
      e = json.load(f)
    pv = e["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", pv["commit"]), path
    assert pv["url"] == f"https://github.com/{pv['repo']}/blob/{pv['commit']}/{pv['file']}", path
    assert pv["licence"] and e["source"], path
    assert set(e["metrics"]) <= METRICS and "bpp" in e["metrics"], path
    assert e["dataset"] == published.normalise(e["dataset"]), path
    assert e["lpips_net"] in (None, "alexnet", "vgg16"), path
    for p in e["points"]:
      assert set(p) - {"setting"} <= set(e["metrics"]), (path, p)
      for k, v in p.items():
        if k != "setting":
          lo, hi = RANGES[k]
          assert lo <= v <= hi, (path, k, v)


def test_spot_values_from_the_sources():
  # typed from the source files at the recorded commits
  ms = _by("MS-ILLM", "clic2020")["points"]
  p = min(ms, key=lambda q: abs(q["bpp"] - 0.1206))
  assert (p["fid"], p["kid"], p["lpips"], p["dists"]) == pytest.approx(
      (2.645052433013916, 0.0003830193891189992, 0.05409831926226616, 0.0480383038520813))
  kodak = _by("MS-ILLM", "kodak")["points"]
  assert len(kodak) == 6 and all("fid" not in q for q in kodak)      # no FID on 24 images
  assert kodak[0]["psnr"] == pytest.approx(24.729001998901367)
  hific = {q["setting"]: q for q in _by("HiFiC", "kodak")["points"]}
  assert (hific["high"]["bpp"], hific["high"]["lpips"], hific["high"]["psnr"]) == (0.1491, 0.0926, 27.26)
  assert _by("HiFiC", "clic2020")["points"][-1]["fid"] == pytest.approx(9.69120094825416)
  perco = _by("PerCo", "tecnick")["points"]
  assert [q["bpp"] for q in perco] == [0.03198, 0.12573]
  jpeg = _by("JPEG (CompressAI)", "kodak")["points"]
  assert len(jpeg) == 19 and jpeg[0]["bpp"] == pytest.approx(0.22115325927734372)
  assert jpeg[0]["psnr"] == pytest.approx(23.779894921045457)
  cg = _by("Control-GIC", "kodak")["points"]
  assert [(q["bpp"], q["lpips"]) for q in cg][0] == (0.38925, 0.03027) and len(cg) == 4


def test_dataset_filter():
  assert published.normalise("CLIC-2020") == "clic2020" == published.normalise("clic_2020")
  kodak = published.for_dataset("Kodak")
  assert {e["method"] for e in kodak} >= {"MS-ILLM", "HiFiC", "PerCo", "Control-GIC", "JPEG (CompressAI)"}
  assert all(e["dataset"] == "kodak" for e in kodak)
  assert all(e["dataset"] == "clic2020" for e in published.for_dataset("clic2020"))
  assert published.for_dataset(None) == [] and published.for_dataset("my_photos") == []
  assert "kodak" in published.note("my_photos") and "unknown" in published.note(None)


def test_comparable_lpips_backbones():
  ms = _by("MS-ILLM", "kodak")
  assert published.comparable(ms, "lpips", "alexnet") == (True, "")
  ok, why = published.comparable(ms, "lpips", "vgg16")
  assert not ok and "alexnet" in why
  ok, why = published.comparable(_by("Control-GIC", "kodak"), "lpips", "vgg16")
  assert ok and "not stated" in why
  assert not published.comparable(ms, "fid", "alexnet")[0]           # none published on Kodak


@pytest.mark.parametrize("metric", ["lpips", "dists", "psnr"])
def test_bd_rate_sign_for_lower_is_better(metric):
  """A curve needing 20% fewer bits at every quality level is -20%, whichever way the
  metric points; one 0.01 LPIPS/DISTS worse at equal rate needs more bits (positive)."""
  ref = _by("MS-ILLM", "kodak")["points"]
  ours = [dict(p, bpp=0.8 * p["bpp"]) for p in ref]
  got, missing = published.bd_rates(ours, "kodak", "alexnet", (metric,))
  assert got["hvq_vs_MS-ILLM[published]_" + metric] == pytest.approx(-20.0, abs=1e-6)
  if metric != "psnr":
    worse = [dict(p, **{metric: p[metric] + 0.01}) for p in ref]
    r, m = [p["bpp"] for p in ref], [p[metric] for p in ref]
    assert bd_rate.bd_rate(r, m, r, [p[metric] for p in worse]) > 0
  _, missing = published.bd_rates(ours, "kodak", "vgg16", ("lpips",))
  assert "alexnet" in missing["hvq_vs_MS-ILLM[published]_lpips"]


def _fake_results(d, dataset):
  os.makedirs(d, exist_ok=True)
  rows = []
  for i, bpp in enumerate((0.05, 0.1, 0.2, 0.4)):
    rows.append(dict(image="a", method="hvq", setting=f"s{i}", bpp=bpp, psnr=24 + 4 * i,
                     ms_ssim=0.8 + 0.04 * i, lpips=0.2 / (i + 1), dists=0.15 / (i + 1)))
  evaluate.write_csv(rows, os.path.join(d, "results.csv"))
  evaluate.write_csv([dict(method="hvq", setting=f"s{i}", fid=30 / (i + 1), kid=0.01 / (i + 1),
                           patches=192, images=24) for i in range(4)],
                     os.path.join(d, "fid_kid.csv"), evaluate.FID_KID_FIELDS)
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(dict(dataset=dataset, lpips=dict(net="alexnet"), fid_kid=dict(patches=192)), f)


def test_plots_draw_only_the_same_dataset(tmp_path):
  _fake_results(str(tmp_path / "k"), "kodak")
  files = plots.rd_plots([str(tmp_path / "k")], str(tmp_path / "k"))
  with open(tmp_path / "k" / "rd_plots.json") as f:
    rec = json.load(f)
  assert rec["dataset"] == "kodak"
  figs = rec["figures"]
  assert set(figs) == {"psnr", "ms_ssim", "lpips", "dists", "fid", "kid"}
  for key, fig in figs.items():
    pub = [c for c in fig["curves"] if "published" in c]
    assert all("[kodak," in c for c in pub), (key, pub)
  assert any(c.startswith("MS-ILLM [kodak") for c in figs["dists"]["curves"])
  assert any(c.startswith("HiFiC [kodak") for c in figs["lpips"]["curves"])
  assert any(c.startswith("Control-GIC [kodak") for c in figs["lpips"]["curves"])
  assert not any("published" in c for c in figs["fid"]["curves"])
  assert "no published fid for kodak" in figs["fid"]["note"] and "192 patches" in figs["fid"]["title"]
  assert (tmp_path / "k" / "rd_dists.png").stat().st_size > 1000

  _fake_results(str(tmp_path / "c"), "clic2020")
  plots.rd_plots([str(tmp_path / "c")], str(tmp_path / "c"))
  with open(tmp_path / "c" / "rd_plots.json") as f:
    figs = json.load(f)["figures"]
  fid_pub = [c for c in figs["fid"]["curves"] if "published" in c]
  assert fid_pub and all("[clic2020," in c for c in fid_pub)
  assert any("MS-ILLM" in c for c in fid_pub) and any("HiFiC" in c for c in fid_pub)

  _fake_results(str(tmp_path / "u"), None)
  plots.rd_plots([str(tmp_path / "u")], str(tmp_path / "u"))
  with open(tmp_path / "u" / "rd_plots.json") as f:
    figs = json.load(f)["figures"]
  for fig in figs.values():
    assert fig["curves"] == ["hvq"] and "dataset unknown" in fig["note"]
  plots.rd_plots([str(tmp_path / "u")], str(tmp_path / "u"), dataset="my_photos")
  with open(tmp_path / "u" / "rd_plots.json") as f:
    figs = json.load(f)["figures"]
  assert all(fig["curves"] == ["hvq"] and "known: " in fig["note"] for fig in figs.values())
