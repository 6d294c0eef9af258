"""The text `hvq eval` prints: one line per method and setting with every metric, the
FID/KID patch scheme and count, BD-rates, and what could not be computed and why."""
from typing import Dict, List

COLUMNS = (("bpp", "bpp", "{:.4f}"), ("psnr", "PSNR", "{:.2f}"), ("ms_ssim", "MS-SSIM", "{:.4f}"),
           ("lpips", "LPIPS", "{:.4f}"), ("dists", "DISTS", "{:.4f}"), ("fid", "FID/256", "{:.2f}"),
           ("kid", "KID/256", "{:.5f}"))


def _fmt(v, f):
  return "-" if v is None else f.format(v)


def table(curves: Dict[str, List[Dict]]) -> List[str]:
  head = f"{'method':8s} {'setting':30s} " + " ".join(f"{h:>8s}" for _, h, _ in COLUMNS)
  out = [head]
  for m, pts in curves.items():
    for p in pts:
      out.append(f"{m:8s} {p['setting'][:30]:30s} "
                 + " ".join(f"{_fmt(p.get(k), f):>8s}" for k, _, f in COLUMNS))
  return out


def lines(summary: Dict) -> List[str]:
  out = table(summary["curves"])
  fk = summary.get("fid_kid", {})
  if fk.get("available"):
    kid_m = fk.get("kid_subset_size")
    out.append(f"FID/KID: {fk['scheme']}; {fk['patches']} patches per method and setting"
               + (f"; KID subsets of {kid_m}" if kid_m else "")
               + ("  (few patches: FID is biased upwards, compare at equal patch counts)"
                  if fk["patches"] < 2048 else ""))
  else:
    out.append(f"FID/KID not computed: {fk.get('missing_reason')}")
  for k in ("lpips", "dists"):
    info = summary.get(k, {})
    if not info.get("available"):
      out.append(f"{k.upper()} not computed: {info.get('missing_reason')}")
  if "hyperprior_saving_vs_static" in summary and summary["hyperprior_saving_vs_static"] is not None:
    out.append(f"hyperprior saving vs static histogram: {summary['hyperprior_saving_vs_static']:+.1%} "
               f"(vs Huffman {summary['hyperprior_saving_vs_huffman']:+.1%})")
  bd = {k: v for k, v in {**summary.get("bd_rate_percent", {}),
                          **summary.get("bd_rate_vs_published_percent", {})}.items() if v is not None}
  if bd:
    out.append("BD-rate of hvq (%, negative saves bits) at equal metric:")
    out += [f"  {k}: {v:+.1f}" for k, v in bd.items()]
  else:
    out.append("BD-rate: none computed (no curve pair shares a metric range with 2+ points; "
               "reasons in summary.json bd_rate_*not_computed)")
  out.append(f"published curves: {summary.get('published_note', '')}"
             + (" — " + ", ".join(sorted({e['method'] for e in summary.get('published', [])}))
                if summary.get("published") else ""))
  return out
