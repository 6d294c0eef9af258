"""Build the photo corpus: real photographs from Debian packages, pinned by SHA-256.

    python scripts/prepare_corpus.py --out DIR [--cache DEBS] [--demo-photos hvq_jax/photos]

Downloads each package the manifest (scripts/corpus_manifest.json) names with
`apt-get download` into the cache folder (a .deb already there is reused), unpacks it with
`dpkg-deb -x`, checks every photo against its pinned SHA-256 and writes

    DIR/train/NAME.png      short side --train-short-side (768): training takes random crops
    DIR/heldout/NAME.png    short side --heldout-short-side (512): coded whole, never cropped
    DIR/copyright/PACKAGE   each package's copyright file (the photos' licences)
    DIR/MANIFEST.json       what was written, with each output's SHA-256

Photos are downscaled with PIL's LANCZOS filter, never upscaled, and never cropped. The
output is built in a temporary folder beside DIR and renamed at the end: an error leaves
no half-written DIR. --demo-photos FOLDER also writes the small JPEGs the package ships
for the demo (the manifest's "demo" photos, all from the training split) and their
SOURCES.md; --contact-sheets FOLDER the pictures of both splits that docs/corpus.md shows.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from PIL import Image

from hvq_jax.images import ImageError, read_image

MANIFEST = Path(__file__).with_name("corpus_manifest.json")
DEFAULT_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "hvq_jax" / "debs")
# Kept out of the corpus entirely: it is reserved for independent checks of the project.
REFUSED_PACKAGES = frozenset({"mate-backgrounds"})
SPLITS = ("train", "heldout")
# Licences that let the package ship a downscaled copy (demo photos).
REDISTRIBUTABLE = frozenset({"CC0-1.0", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0",
                             "CC-BY-SA-4.0", "public-domain"})
DEMO_LONG_SIDE = 512
DEMO_QUALITY = 90
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MARKER = "hvq_jax photo corpus"


class CorpusError(Exception):
  """A problem the user can fix; the message is one line that names it."""


# ---- manifest ---------------------------------------------------------------------------
def refuse(package: str) -> None:
  if package in REFUSED_PACKAGES:
    raise CorpusError(f"package {package} is refused: it is kept out of the corpus entirely")


def load_manifest(path: Path) -> dict:
  """The pinned manifest, checked: a bad entry is an error naming it, before any download."""
  try:
    m = json.loads(Path(path).read_text())
  except (OSError, ValueError) as e:
    raise CorpusError(f"cannot read manifest {path}: {e}") from None
  packages, photos = m.get("packages"), m.get("photos")
  if not isinstance(packages, dict) or not isinstance(photos, list) or not photos:
    raise CorpusError(f"{path}: needs a 'packages' object and a non-empty 'photos' list")
  for pkg in packages:
    refuse(pkg)
  seen = set()
  for i, p in enumerate(photos):
    where = f"{path}: photo {i} ({p.get('name', '?')})"
    missing = [k for k in ("name", "split", "package", "path", "sha256", "licence",
                           "copyright", "content") if not isinstance(p.get(k), str)]
    if missing:
      raise CorpusError(f"{where}: missing {', '.join(missing)}")
    refuse(p["package"])
    if not _NAME.match(p["name"]) or p["name"] in seen:
      raise CorpusError(f"{where}: names are unique, lower case, letters, digits and _")
    seen.add(p["name"])
    if p["split"] not in SPLITS:
      raise CorpusError(f"{where}: split must be one of {SPLITS}, not {p['split']!r}")
    if p["package"] not in packages:
      raise CorpusError(f"{where}: package {p['package']} is not in 'packages'")
    if p["path"].startswith("/") or ".." in Path(p["path"]).parts:
      raise CorpusError(f"{where}: path must be relative to the package root: {p['path']}")
    if not _SHA256.match(p["sha256"]):
      raise CorpusError(f"{where}: sha256 must be 64 lower-case hex digits")
    if p.get("demo") and (p["split"] != "train" or p["licence"] not in REDISTRIBUTABLE):
      raise CorpusError(f"{where}: a demo photo is a training photo with a licence that "
                        f"allows redistribution ({', '.join(sorted(REDISTRIBUTABLE))})")
  return m


# ---- packages ---------------------------------------------------------------------------
def _tool(name: str, why: str) -> str:
  exe = shutil.which(name)
  if exe is None:
    raise CorpusError(f"{name} not found: {why} (Debian and Ubuntu have it; elsewhere run "
                      f"this script in a Debian container)")
  return exe


def _last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1].strip() if lines else "no message"


def apt_download(package: str, folder: Path) -> None:
  """`apt-get download PACKAGE` run in `folder` (the candidate version of the apt sources)."""
  refuse(package)
  exe = _tool("apt-get", f"it downloads {package}; or put {package}'s .deb into {folder}")
  r = subprocess.run([exe, "download", package], cwd=folder, capture_output=True, text=True)
  if r.returncode != 0:
    raise CorpusError(
        f"cannot download {package}: apt-get download says '{_last_line(r.stderr)}'; run "
        f"'apt-get update' (the package is in Debian 12 'bookworm' main), or put "
        f"{package}'s .deb into {folder}")


def deb_fields(deb: Path) -> Dict[str, str]:
  exe = _tool("dpkg-deb", "it reads and unpacks the .deb packages")
  r = subprocess.run([exe, "-f", str(deb), "Package", "Version"], capture_output=True,
                     text=True)
  if r.returncode != 0:
    raise CorpusError(f"{deb} is not a readable .deb ({_last_line(r.stderr)}); delete it "
                      f"and run again")
  return dict(l.split(": ", 1) for l in r.stdout.strip().splitlines() if ": " in l)


def _debs_of(cache: Path, package: str) -> List[Path]:
  return [d for d in sorted(cache.glob(f"{package}_*.deb"))
          if deb_fields(d).get("Package") == package]


def fetch_deb(cache: Path, package: str, version: str,
              download: Callable[[str, Path], None]) -> Path:
  """The .deb of `package` in `cache`: the pinned version when there, else a download."""
  refuse(package)
  debs = _debs_of(cache, package)
  for d in debs:
    if deb_fields(d).get("Version") == version:
      return d
  download(package, cache)
  debs = _debs_of(cache, package)
  if not debs:
    raise CorpusError(f"downloading {package} left no {package}_*.deb in {cache}")
  return max(debs, key=lambda d: d.stat().st_mtime)


def unpack(deb: Path, into: Path) -> None:
  exe = _tool("dpkg-deb", "it unpacks the .deb packages")
  r = subprocess.run([exe, "-x", str(deb), str(into)], capture_output=True, text=True)
  if r.returncode != 0:
    raise CorpusError(f"cannot unpack {deb} ({_last_line(r.stderr)}); delete it and run "
                      f"again")


def sha256_of(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ---- images -----------------------------------------------------------------------------
def scaled_size(width: int, height: int, short_side: int) -> tuple:
  """(w, h) with the short side `short_side` and the aspect ratio kept; never larger."""
  short = min(width, height)
  if short <= short_side:
    return width, height
  s = short_side / short
  return ((short_side, max(1, round(height * s))) if width <= height
          else (max(1, round(width * s)), short_side))


def downscaled(rgb: np.ndarray, size: tuple) -> Image.Image:
  im = Image.fromarray(rgb, "RGB")
  return im if im.size == tuple(size) else im.resize(size, Image.LANCZOS)


def long_side_size(width: int, height: int, long_side: int) -> tuple:
  """(w, h) with the long side `long_side` and the aspect ratio kept; never larger."""
  if max(width, height) <= long_side:
    return width, height
  s = long_side / max(width, height)
  return max(1, round(width * s)), max(1, round(height * s))


def _save_png(im: Image.Image, path: Path) -> None:
  im.save(path, format="PNG")   # Pillow writes no timestamp: same pixels, same bytes


def _save_jpeg(im: Image.Image, path: Path) -> None:
  im.save(path, format="JPEG", quality=DEMO_QUALITY, subsampling="4:2:0", optimize=False,
          progressive=False)


# ---- the corpus -------------------------------------------------------------------------
def _check_out(out: Path) -> None:
  """`out` may be replaced only when it is absent, empty, or a corpus this script wrote."""
  if not out.exists():
    return
  if not out.is_dir():
    raise CorpusError(f"--out {out} exists and is not a folder")
  if any(out.iterdir()):
    try:
      ours = json.loads((out / "MANIFEST.json").read_text()).get("corpus") == _MARKER
    except (OSError, ValueError, AttributeError):
      ours = False
    if not ours:
      raise CorpusError(f"--out {out} exists and is not a corpus written by this script; "
                        f"choose another folder or remove it")


def _replace(tmp: Path, out: Path) -> None:
  old = None
  if out.exists():
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
  tmp.rename(out)
  if old is not None:
    shutil.rmtree(old)


def _demo_sources(demo: List[dict], versions: Dict[str, str], written: Dict[str, tuple]
                  ) -> str:
  """SOURCES.md of the demo photos; `written`: name -> ((w, h), SHA-256 of the JPEG)."""
  rows = []
  for p in demo:
    (w, h), digest = written[p["name"]]
    note = f" ({p['licence_note']})" if p.get("licence_note") else ""
    rows.append(f"| `{p['name']}.jpg` | {w}x{h} | `{digest}` | "
                f"{p['package']} {versions[p['package']]} | `{p['path']}` | "
                f"`{p['sha256']}` | {p['licence']} | {p['copyright']}{note} | {p['content']} |")
  return "\n".join([
      "# Demo photos",
      "",
      "Small photos from the training split of the photo corpus (docs/corpus.md), shipped "
      "so the demo sees the colours the scikit-image and scikit-learn photos lack: greens "
      "of grass and leaves, blues of sky and water, warm earth tones.",
      "",
      f"Each is its Debian package's file, checked against the SHA-256 below, decoded to "
      f"RGB, downscaled with PIL's LANCZOS filter to {DEMO_LONG_SIDE} px on the long side "
      f"and saved as JPEG quality {DEMO_QUALITY} (4:2:0). Licence and copyright are as the "
      f"package's `usr/share/doc/PACKAGE/copyright` states. They are rebuilt by",
      "",
      "    python scripts/prepare_corpus.py --out DIR --demo-photos hvq_jax/photos",
      "",
      "| file | size | SHA-256 | source package | path in the package | source SHA-256 "
      "| licence | copyright | content |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
      *rows,
      ""])


def _write_demo(folder: Path, tmp_demo: Path, text: str) -> None:
  """Replace the demo photos in `folder` (package data) file by file, stale ones removed."""
  folder.mkdir(parents=True, exist_ok=True)
  new = {f.name for f in tmp_demo.glob("*.jpg")}
  for f in folder.glob("*.jpg"):
    if f.name not in new:
      f.unlink()
  for f in sorted(tmp_demo.glob("*.jpg")):
    os.replace(f, folder / f.name)
  (folder / "SOURCES.md").write_text(text)


def _verify(root: Path, photos: List[dict], pkg: str, version: str, pinned: str) -> None:
  """Every photo of one package against its pinned SHA-256, before any is written."""
  for p in photos:
    src = root / p["path"]
    if not src.is_file():
      raise CorpusError(f"{p['path']} is missing from {pkg} {version} "
                        f"(manifest pins {pinned})")
    got = sha256_of(src)
    if got != p["sha256"]:
      raise CorpusError(f"{p['path']} in {pkg} {version}: SHA-256 {got}, manifest pins "
                        f"{p['sha256']} ({pkg} {pinned})")


def _write_photo(rgb: np.ndarray, p: dict, short_side: int, tmp: Path, source: dict) -> dict:
  """One photo, downscaled, as tmp/SPLIT/NAME.png; returns its MANIFEST.json entry."""
  h, w = rgb.shape[:2]
  im = downscaled(rgb, scaled_size(w, h, short_side))
  rel = f"{p['split']}/{p['name']}.png"
  _save_png(im, tmp / rel)
  entry = {k: p[k] for k in ("name", "split", "content", "licence", "copyright",
                             "licence_note") if k in p}
  entry.update(file=rel, width=im.size[0], height=im.size[1], sha256=sha256_of(tmp / rel),
               source=dict(source, path=p["path"], width=w, height=h, sha256=p["sha256"]))
  return entry


def _write_demo_photo(rgb: np.ndarray, path: Path) -> tuple:
  h, w = rgb.shape[:2]
  small = downscaled(rgb, long_side_size(w, h, DEMO_LONG_SIDE))
  _save_jpeg(small, path)
  return small.size, sha256_of(path)


def _new_folder(parent: Path, name: str) -> Path:
  """An empty folder beside the output, with the permissions a plain mkdir gives."""
  tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)   # mkdtemp's folder is private; the corpus is not
  return tmp


def prepare(out: Path, manifest: dict, cache: Path, train_short_side: int = 768,
            heldout_short_side: int = 512, demo_dir: Optional[Path] = None,
            download: Callable[[str, Path], None] = apt_download,
            log: Callable[[str], None] = print) -> dict:
  """Write the corpus to `out` (see the module docstring); returns its MANIFEST.json."""
  if min(train_short_side, heldout_short_side) < 1:
    raise CorpusError("short sides must be positive")
  out, cache = Path(out).absolute(), Path(cache).absolute()
  _check_out(out)
  _tool("dpkg-deb", "it unpacks the .deb packages")
  cache.mkdir(parents=True, exist_ok=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  short = {"train": train_short_side, "heldout": heldout_short_side}
  written, versions, demo = [], {}, {}
  tmp = _new_folder(out.parent, out.name)
  try:
    for sub in (*SPLITS, "copyright", "demo"):
      (tmp / sub).mkdir()
    for pkg, pinned in manifest["packages"].items():
      photos = [p for p in manifest["photos"] if p["package"] == pkg]
      if not photos:
        continue
      deb = fetch_deb(cache, pkg, pinned, download)
      version = versions[pkg] = deb_fields(deb).get("Version", "?")
      log(f"{pkg} {version}: {len(photos)} photo{'s' * (len(photos) != 1)}")
      with tempfile.TemporaryDirectory(prefix="unpacked-", dir=tmp) as root:
        root = Path(root)
        unpack(deb, root)
        _verify(root, photos, pkg, version, pinned)
        copyright_file = root / "usr/share/doc" / pkg / "copyright"
        if copyright_file.is_file():
          shutil.copyfile(copyright_file, tmp / "copyright" / pkg)
        for p in photos:
          rgb = read_image(str(root / p["path"]))
          written.append(_write_photo(rgb, p, short[p["split"]], tmp,
                                      {"package": pkg, "version": version}))
          if demo_dir is not None and p.get("demo"):
            demo[p["name"]] = _write_demo_photo(rgb, tmp / "demo" / f"{p['name']}.jpg")
    order = {p["name"]: i for i, p in enumerate(manifest["photos"])}
    written.sort(key=lambda e: order[e["name"]])
    result = {
        "corpus": _MARKER,
        "rebuild": "python scripts/prepare_corpus.py --out DIR",
        "train_short_side": train_short_side, "heldout_short_side": heldout_short_side,
        "resize": "PIL LANCZOS to the split's short side, never upscaled, never cropped",
        "packages": dict(sorted(versions.items())),
        "counts": {s: sum(e["split"] == s for e in written) for s in SPLITS},
        "photos": written,
    }
    (tmp / "MANIFEST.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if demo_dir is not None:
      chosen = [p for p in manifest["photos"] if p.get("demo")]
      _write_demo(Path(demo_dir), tmp / "demo", _demo_sources(chosen, versions, demo))
    shutil.rmtree(tmp / "demo")
    _replace(tmp, out)
    return result
  except ImageError as e:
    raise CorpusError(str(e)) from None
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def contact_sheet(corpus: Path, split: str, path: Path, columns: int = 6,
                  cell: int = 200) -> None:
  """A JPEG of the split's photos as labelled thumbnails, for docs/corpus.md."""
  from PIL import ImageDraw, ImageFont
  m = json.loads((Path(corpus) / "MANIFEST.json").read_text())
  photos = [e for e in m["photos"] if e["split"] == split]
  label = 14
  rows = -(-len(photos) // columns)
  sheet = Image.new("RGB", (columns * cell, rows * (cell + label)), "white")
  draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
  for i, e in enumerate(photos):
    with Image.open(Path(corpus) / e["file"]) as im:
      im = im.convert("RGB")
      im.thumbnail((cell - 4, cell - 4), Image.LANCZOS)
    x, y = (i % columns) * cell, (i // columns) * (cell + label)
    sheet.paste(im, (x + (cell - im.size[0]) // 2, y + (cell - im.size[1]) // 2))
    draw.text((x + 3, y + cell), e["name"], fill="black", font=font)
  sheet.save(path, format="JPEG", quality=80)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, type=Path, help="corpus folder to write")
  ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                  help=f"folder for the downloaded .deb files (default {DEFAULT_CACHE})")
  ap.add_argument("--manifest", type=Path, default=MANIFEST, help="pinned photo list")
  ap.add_argument("--train-short-side", type=int, default=768)
  ap.add_argument("--heldout-short-side", type=int, default=512)
  ap.add_argument("--demo-photos", type=Path, default=None, metavar="FOLDER",
                  help="also write the demo's small JPEGs and SOURCES.md here "
                       "(hvq_jax/photos)")
  ap.add_argument("--contact-sheets", type=Path, default=None, metavar="FOLDER",
                  help="also write corpus_train.jpg and corpus_heldout.jpg here (docs)")
  args = ap.parse_args(argv)
  t0 = time.time()
  try:
    m = load_manifest(args.manifest)
    r = prepare(args.out, m, args.cache, args.train_short_side, args.heldout_short_side,
                args.demo_photos)
  except CorpusError as e:
    print(f"prepare_corpus: error: {e}", file=sys.stderr)
    return 1
  if args.contact_sheets is not None:
    args.contact_sheets.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
      contact_sheet(args.out, split, args.contact_sheets / f"corpus_{split}.jpg")
  print(f"wrote {args.out}: {r['counts']['train']} training and {r['counts']['heldout']} "
        f"held-out photos in {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
