"""One-off: transcribe the field's published RD points into hvq_jax/evaluation/reference/.

Reads the source files from local clones (git directories) of the repositories at the
commits recorded below and writes one JSON file per (method, dataset) with the source
repository, file, commit, URL and licence. Run again only to refresh the numbers:

  python benchmarks/transcribe_published.py --neuralcompression DIR --diffeic DIR \
      --compressai DIR --controlgic DIR

DiffEIC's `indicators/results.xlsx` needs openpyxl (`pip install openpyxl`), used only here.
Only numbers are copied; no code or file of those repositories is committed.
"""
import argparse
import csv
import io
import json
import os
import re
import subprocess

OUT = os.path.join(os.path.dirname(__file__), "..", "hvq_jax", "evaluation", "reference")


def git_show(repo_dir, commit, path) -> bytes:
  return subprocess.run(["git", "--git-dir", repo_dir, "show", f"{commit}:{path}"],
                        check=True, capture_output=True).stdout


def head(repo_dir) -> str:
  return subprocess.run(["git", "--git-dir", repo_dir, "rev-parse", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()


def provenance(repo, path, commit, licence):
  return dict(repo=repo, file=path, commit=commit,
              url=f"https://github.com/{repo}/blob/{commit}/{path}", licence=licence)


def write(name, entry):
  path = os.path.join(OUT, name)
  with open(path, "w") as f:
    json.dump(entry, f, indent=1)
    f.write("\n")
  print(path, len(entry["points"]), "points")


def neuralcompression(repo_dir):
  commit, path = head(repo_dir), "projects/illm/results.csv"
  rows = list(csv.DictReader(io.StringIO(git_show(repo_dir, commit, path).decode())))
  for ds in ("kodak", "clic2020", "div2k"):
    pts = []
    for r in rows:
      if r["model"] != "MS-ILLM" or r["dataset"] != ds:
        continue
      p = {k: float(r[k]) for k in ("bpp", "psnr", "ms_ssim", "lpips", "dists", "fid", "kid")
           if r[k] != ""}
      pts.append(p)
    write(f"msillm_{ds}.json", dict(
        method="MS-ILLM", dataset=ds,
        source="Muckley et al., Improving Statistical Fidelity for Neural Image Compression "
               "with Implicit Local Likelihood Models, ICML 2023; the authors' table "
               "(NeuralCompression projects/illm/results.csv)",
        provenance=provenance("facebookresearch/NeuralCompression", path, commit,
                              "MIT (NeuralCompression); figures transcribed"),
        metrics=sorted({k for p in pts for k in p}),
        lpips_net="alexnet",
        fid_protocol=("FID/256 and KID/256: 256x256 patches plus a 128-px-shifted grid "
                      "(neuralcompression.metrics.update_patch_fid), torch-fidelity Inception"
                      if ds != "kodak" else None),
        notes=("LPIPS: torchmetrics' default AlexNet LPIPS; DISTS: DISTS_pytorch on full "
               "images. No FID/KID on Kodak (too few patches). CLIC2020: the test split "
               "NeuralCompression calls 'test_fid'." ),
        points=sorted(pts, key=lambda p: p["bpp"])))


DIFFEIC_SHEETS = {"Kodak": "kodak", "CLIC2020": "clic2020", "Tecnick": "tecnick"}
DIFFEIC_COLS = {"bpp": "bpp", "LPIPS": "lpips", "MS-SSIM": "ms_ssim", "PSNR": "psnr",
                "DISTS": "dists", "FID": "fid", "KID": "kid"}


def diffeic(repo_dir):
  import openpyxl
  commit, path = head(repo_dir), "indicators/results.xlsx"
  wb = openpyxl.load_workbook(io.BytesIO(git_show(repo_dir, commit, path)), data_only=True)
  for sheet, ds in DIFFEIC_SHEETS.items():
    rows = [r for r in wb[sheet].iter_rows(values_only=True) if any(v is not None for v in r)]
    header = rows[1]        # the first method's column names; every block shares them
    blocks, current = {}, None
    for r in rows:
      if r[0] is not None and all(v is None for v in r[1:]):
        current = blocks.setdefault(str(r[0]), [])
      elif current is not None and r[1] not in ("bpp", None):
        current.append(r)
    for method, key in (("HiFiC", "hific"), ("PerCo", "perco")):
      pts = []
      for r in blocks[method]:
        p = dict(setting=str(r[0]))
        for col, v in zip(header, r):
          if col in DIFFEIC_COLS and isinstance(v, (int, float)):
            p[DIFFEIC_COLS[col]] = float(v)
        pts.append(p)
      write(f"{key}_{ds}_diffeic.json", dict(
          method=method, dataset=ds,
          source=f"{method} as measured by DiffEIC (Li et al., Towards Extreme Image "
                 "Compression with Latent Feature Guidance and Diffusion Prior, IEEE TCSVT "
                 "2024), their indicators/results.xlsx, sheet " + sheet,
          provenance=provenance("huai-chang/DiffEIC", path, commit,
                                "Apache-2.0 (DiffEIC); figures transcribed"),
          metrics=sorted({k for p in pts for k in p} - {"setting"}),
          lpips_net="alexnet",
          fid_protocol=("as DiffEIC computed it (not stated in the repository); its MS-ILLM "
                        "FID on CLIC2020 differs from MS-ILLM's own table, so FIDs across "
                        "sources are not comparable" if ds != "kodak" else None),
          notes=("LPIPS backbone inferred: DiffEIC's MS-ILLM Kodak rows equal MS-ILLM's own "
                 "AlexNet LPIPS and DISTS (0.0732 vs 0.07318 at 0.153 bpp)."),
          points=sorted(pts, key=lambda p: p["bpp"])))


def compressai(repo_dir):
  commit, path = head(repo_dir), "results/image/kodak/jpeg.json"
  d = json.loads(git_show(repo_dir, commit, path))
  res = d["results"]
  pts = [dict(bpp=b, psnr=p, ms_ssim=m) for b, p, m in
         zip(res["bpp"], res["psnr-rgb"], res["ms-ssim-rgb"])]
  write("jpeg_kodak_compressai.json", dict(
      method="JPEG (CompressAI)", dataset="kodak",
      source=f"CompressAI's Kodak JPEG curve ({d.get('description', '')}), RGB PSNR and MS-SSIM",
      provenance=provenance("InterDigitalInc/CompressAI", path, commit,
                            "BSD-3-Clause-Clear (CompressAI); figures transcribed"),
      metrics=["bpp", "ms_ssim", "psnr"], lpips_net=None, fid_protocol=None,
      notes="Pillow's JPEG at qualities 1..95 (4:2:0); our own JPEG rows use the same encoder.",
      points=pts))


def controlgic(repo_dir):
  commit, path = head(repo_dir), "README.md"
  text = git_show(repo_dir, commit, path).decode()
  pts = []
  for m in re.finditer(r"\|\s*\(([\d.]+),\s*([\d.]+),\s*([\d.]+)\)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", text):
    c, md, f, bpp, lp = m.groups()
    pts.append(dict(setting=f"ratios={c},{md},{f}", bpp=float(bpp), lpips=float(lp)))
  write("controlgic_kodak_readme.json", dict(
      method="Control-GIC", dataset="kodak",
      source="Control-GIC (Li et al., ICLR 2025) README, 'Fine control of bitrate' table "
             "(Kodak, granularity ratios near (0.3, 0.6, 0.1)); the paper's curves are figures only",
      provenance=provenance("lianqi1008/Control-GIC", path, commit,
                            "no licence file in the repository; four figures quoted with attribution"),
      metrics=["bpp", "lpips"], lpips_net=None, fid_protocol=None,
      notes="The README does not name the LPIPS backbone; all four points lie at 0.39 bpp.",
      points=pts))


def main():
  ap = argparse.ArgumentParser()
  for k in ("neuralcompression", "diffeic", "compressai", "controlgic"):
    ap.add_argument(f"--{k}", help="git directory of a clone")
  a = ap.parse_args()
  for k, fn in (("neuralcompression", neuralcompression), ("diffeic", diffeic),
                ("compressai", compressai), ("controlgic", controlgic)):
    if getattr(a, k):
      fn(getattr(a, k))


if __name__ == "__main__":
  main()
