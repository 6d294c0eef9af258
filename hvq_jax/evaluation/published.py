"""The field's published RD points (reference/*.json) and when they may be compared with ours.

A published curve is only comparable when it was measured on the same dataset (Kodak
numbers never sit beside CLIC2020 ones) and, for LPIPS, with the same backbone (AlexNet
and VGG LPIPS differ by a factor). Each file records its dataset, metrics, LPIPS
backbone (null when the source does not say), FID protocol and provenance (repository,
file, commit, URL, licence).
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

from hvq_jax.evaluation import baselines
from hvq_jax.evaluation.bd_rate import bd_rate

BD_METRICS = ("psnr", "ms_ssim", "lpips", "dists")


def normalise(dataset: Optional[str]) -> Optional[str]:
  """'Kodak' / 'CLIC-2020' / 'clic_2020' -> 'kodak' / 'clic2020'; None stays None."""
  if dataset is None:
    return None
  return re.sub(r"[\s_\-]", "", dataset).lower() or None


def known_datasets() -> List[str]:
  return sorted({normalise(e["dataset"]) for e in baselines.published()})


def for_dataset(dataset: Optional[str], extra_files: Optional[Sequence[str]] = None) -> List[Dict]:
  """Published entries measured on `dataset` (none when the dataset is unknown)."""
  d = normalise(dataset)
  if d is None:
    return []
  return [e for e in baselines.published(extra_files) if normalise(e["dataset"]) == d]


def note(dataset: Optional[str]) -> str:
  """One line on which published curves accompany results on `dataset`."""
  if normalise(dataset) is None:
    return "dataset unknown (pass --dataset kodak|clic2020|...): no published curves"
  if not for_dataset(dataset):
    return f"no published curves for '{normalise(dataset)}' (known: {', '.join(known_datasets())})"
  return f"published curves measured on {normalise(dataset)} only"


def comparable(entry: Dict, metric: str, lpips_net: Optional[str]) -> Tuple[bool, str]:
  """(drawable, caveat) for one metric of a published entry beside our numbers."""
  if not any(p.get(metric) is not None for p in entry["points"]):
    return False, f"no published {metric}"
  if metric == "lpips":
    theirs = entry.get("lpips_net")
    if theirs is None:
      return True, "LPIPS backbone not stated"
    if lpips_net is not None and theirs != lpips_net:
      return False, f"LPIPS-{theirs}, ours is LPIPS-{lpips_net}"
  if metric in ("fid", "kid") and entry.get("fid_protocol"):
    return True, entry["fid_protocol"]
  return True, ""


def label(entry: Dict) -> str:
  repo = entry.get("provenance", {}).get("repo", "")
  return f"{entry['method']} [{normalise(entry['dataset'])}, published{': ' + repo.split('/')[-1] if repo else ''}]"


def bd_rates(ours: List[Dict], dataset: Optional[str], lpips_net: Optional[str],
             metrics: Sequence[str] = BD_METRICS) -> Tuple[Dict[str, float], Dict[str, str]]:
  """BD-rate (%) of our curve against each comparable published curve of `dataset`:
  ({'hvq_vs_<method>[published]_<metric>': %}, {same key: why not computed})."""
  out, missing = {}, {}
  for e in for_dataset(dataset):
    for m in metrics:
      key = f"hvq_vs_{e['method']}[published]_{m}"
      ok, why = comparable(e, m, lpips_net)
      if not ok:
        if not why.startswith("no published"):
          missing[key] = why
        continue
      a = [(p["bpp"], p[m]) for p in e["points"] if p.get(m) is not None]
      b = [(p["bpp"], p[m]) for p in ours if p.get(m) is not None]
      try:
        out[key] = bd_rate(*zip(*a), *zip(*b))
      except (ValueError, TypeError) as err:
        missing[key] = str(err) if b else f"no {m} of ours"
  return out, missing
