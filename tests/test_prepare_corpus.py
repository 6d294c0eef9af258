"""scripts/prepare_corpus.py on tiny .deb packages built here (no download), and the
shipped demo photos against their SOURCES.md."""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_corpus",
                                               ROOT / "scripts" / "prepare_corpus.py")
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

PKG, VERSION = "fake-photos", "1:2.0-1"
# name -> (path in the package, size, split); PIL sizes are (width, height)
FILES = {"meadow": ("usr/share/backgrounds/meadow.jpg", (300, 200), "train"),
         "tower": ("usr/share/backgrounds/tower.png", (150, 400), "heldout"),
         "sea": ("usr/share/wallpapers/Sea/contents/images/sea.png", (240, 180), "heldout")}


def sha256(path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _photo(size, seed) -> Image.Image:
  w, h = size
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
  a = a + rng.integers(0, 40, a.shape)
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
  """A .deb holding three photos and a copyright file, and the files' SHA-256."""
  root = tmp_path_factory.mktemp("pkgroot")
  (root / "DEBIAN").mkdir()
  (root / "DEBIAN" / "control").write_text(
      f"Package: {PKG}\nVersion: {VERSION}\nArchitecture: all\n"
      f"Maintainer: Nobody <nobody@example.org>\nDescription: test photos\n")
  doc = root / "usr/share/doc" / PKG
  doc.mkdir(parents=True)
  (doc / "copyright").write_text("Files: *\nCopyright: nobody\nLicense: CC0-1.0\n")
  hashes = {}
  for i, (name, (rel, size, _)) in enumerate(FILES.items()):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    _photo(size, i).save(root / rel)
    hashes[name] = sha256(root / rel)
  out = tmp_path_factory.mktemp("debs") / f"{PKG}_2.0-1_all.deb"
  subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(root), str(out)],
                 check=True, capture_output=True)
  return out, hashes


def manifest(hashes, **changes):
  photos = [{"name": n, "split": split, "package": PKG, "path": rel, "sha256": hashes[n],
             "licence": "CC0-1.0", "copyright": "nobody", "content": n}
            for n, (rel, _, split) in FILES.items()]
  photos[0]["demo"] = True
  for name, fields in changes.items():
    next(p for p in photos if p["name"] == name).update(fields)
  return {"packages": {PKG: VERSION}, "photos": photos}


class Downloader:
  """Stands in for apt-get download: copies the .deb into the cache, counts calls."""

  def __init__(self, deb):
    self.deb, self.calls = deb, []

  def __call__(self, package, folder):
    self.calls.append(package)
    shutil.copy(self.deb, Path(folder) / self.deb.name)


def run(tmp_path, deb, m, out_name="corpus", **kw):
  download = kw.pop("download", None) or Downloader(deb[0])
  out = tmp_path / out_name
  r = pc.prepare(out, m, tmp_path / "cache", train_short_side=96, heldout_short_side=64,
                 download=download, log=lambda s: None, **kw)
  return out, r, download


def _leftovers(folder: Path):
  return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@needs_dpkg
def test_writes_both_splits_with_hashes(tmp_path, deb):
  out, r, download = run(tmp_path, deb, manifest(deb[1]))
  assert download.calls == [PKG]
  assert sorted(p.name for p in (out / "train").iterdir()) == ["meadow.png"]
  assert sorted(p.name for p in (out / "heldout").iterdir()) == ["sea.png", "tower.png"]
  assert (out / "copyright" / PKG).read_text().startswith("Files: *")
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o777 & ~umask   # not mkdtemp's private folder
  written = json.loads((out / "MANIFEST.json").read_text())
  assert written["counts"] == {"train": 1, "heldout": 2}
  assert written["packages"] == {PKG: VERSION}
  for e in written["photos"]:
    assert e["sha256"] == sha256(out / e["file"])
    assert e["source"]["sha256"] == deb[1][e["name"]]
    with Image.open(out / e["file"]) as im:
      assert im.mode == "RGB" and im.size == (e["width"], e["height"])
  assert _leftovers(tmp_path) == []


@needs_dpkg
def test_sizes_keep_the_aspect_and_never_crop(tmp_path, deb):
  out, _, _ = run(tmp_path, deb, manifest(deb[1]))
  # 300x200 -> short side 96; 150x400 portrait -> width 64, height 400 * 64 / 150 = 170.7
  assert Image.open(out / "train/meadow.png").size == (144, 96)
  assert Image.open(out / "heldout/tower.png").size == (64, 171)
  assert Image.open(out / "heldout/sea.png").size == (85, 64)   # 240 * 64 / 180 = 85.3
  # a short side above the source's keeps the source's size: never upscaled
  small = pc.prepare(tmp_path / "native", manifest(deb[1]), tmp_path / "cache",
                     train_short_side=1000, heldout_short_side=1000,
                     download=Downloader(deb[0]), log=lambda s: None)
  assert {e["name"]: (e["width"], e["height"]) for e in small["photos"]} == {
      n: size for n, (_, size, _) in FILES.items()}


@needs_dpkg
def test_second_run_reuses_the_deb_and_writes_identical_files(tmp_path, deb):
  out, _, first = run(tmp_path, deb, manifest(deb[1]))
  before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  out, _, second = run(tmp_path, deb, manifest(deb[1]))
  after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert first.calls == [PKG] and second.calls == []
  assert before == after
  assert _leftovers(tmp_path) == []


@needs_dpkg
def test_tampered_file_is_refused_and_nothing_is_written(tmp_path, deb):
  wrong = "0" * 64
  m = manifest(deb[1], tower={"sha256": wrong})
  with pytest.raises(pc.CorpusError) as e:
    run(tmp_path, deb, m)
  msg = str(e.value)
  assert "\n" not in msg
  assert FILES["tower"][0] in msg and PKG in msg
  assert deb[1]["tower"] in msg and wrong in msg
  assert not (tmp_path / "corpus").exists()
  assert _leftovers(tmp_path) == []


@needs_dpkg
def test_a_failed_run_keeps_the_previous_corpus(tmp_path, deb):
  out, _, _ = run(tmp_path, deb, manifest(deb[1]))
  before = sha256(out / "MANIFEST.json")
  m = manifest(deb[1], sea={"path": "usr/share/backgrounds/gone.png"})
  with pytest.raises(pc.CorpusError, match=r"usr/share/backgrounds/gone\.png is missing "
                                           r"from fake-photos"):
    run(tmp_path, deb, m)
  assert sha256(out / "MANIFEST.json") == before
  assert _leftovers(tmp_path) == []


@needs_dpkg
def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, deb):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "notes.txt").write_text("mine")
  with pytest.raises(pc.CorpusError, match="not a corpus written by this script"):
    run(tmp_path, deb, manifest(deb[1]))
  assert (tmp_path / "corpus" / "notes.txt").read_text() == "mine"


def test_mate_backgrounds_is_refused(tmp_path, monkeypatch):
  m = {"packages": {"mate-backgrounds": "1.0"},
       "photos": [{"name": "x", "split": "train", "package": "mate-backgrounds",
                   "path": "usr/share/x.jpg", "sha256": "0" * 64, "licence": "CC0-1.0",
                   "copyright": "x", "content": "x"}]}
  path = tmp_path / "m.json"
  path.write_text(json.dumps(m))
  with pytest.raises(pc.CorpusError, match="mate-backgrounds is refused"):
    pc.load_manifest(path)
  # and at the download, before apt-get runs
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  marker = tmp_path / "apt-get-ran"
  (bin_dir / "apt-get").write_text(f"#!/bin/sh\ntouch {marker}\n")
  (bin_dir / "apt-get").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  calls = []
  with pytest.raises(pc.CorpusError, match="mate-backgrounds is refused"):
    pc.apt_download("mate-backgrounds", tmp_path)
  with pytest.raises(pc.CorpusError, match="mate-backgrounds is refused"):
    pc.fetch_deb(tmp_path, "mate-backgrounds", "1.0", lambda p, f: calls.append(p))
  assert calls == [] and not marker.exists()


def test_download_failure_names_the_package_and_the_fix(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "apt-get").write_text(
      "#!/bin/sh\necho 'E: Unable to locate package '$2 >&2\nexit 100\n")
  (bin_dir / "apt-get").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  with pytest.raises(pc.CorpusError) as e:
    pc.apt_download("no-such-photos", tmp_path)
  msg = str(e.value)
  assert "cannot download no-such-photos" in msg and "Unable to locate package" in msg
  assert "apt-get update" in msg and str(tmp_path) in msg
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with pytest.raises(pc.CorpusError, match="apt-get not found"):
    pc.apt_download("no-such-photos", tmp_path)


@needs_dpkg
def test_main_prints_one_line_and_exits_1(tmp_path, deb, capsys):
  m = manifest(deb[1], meadow={"sha256": "1" * 64})
  path = tmp_path / "m.json"
  path.write_text(json.dumps(m))
  cache = tmp_path / "cache"
  cache.mkdir()
  shutil.copy(deb[0], cache)          # cached: main downloads nothing
  rc = pc.main(["--out", str(tmp_path / "corpus"), "--cache", str(cache),
                "--manifest", str(path)])
  err = capsys.readouterr().err
  assert rc == 1 and err.count("\n") == 1 and err.startswith("prepare_corpus: error: ")
  assert not (tmp_path / "corpus").exists()


@needs_dpkg
def test_demo_photos_and_their_sources(tmp_path, deb):
  demo = tmp_path / "photos"
  demo.mkdir()
  (demo / "stale.jpg").write_bytes(b"old")
  out, _, _ = run(tmp_path, deb, manifest(deb[1]), demo_dir=demo)
  assert sorted(p.name for p in demo.iterdir()) == ["SOURCES.md", "meadow.jpg"]
  with Image.open(demo / "meadow.jpg") as im:
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (300, 200)
  text = (demo / "SOURCES.md").read_text()
  assert sha256(demo / "meadow.jpg") in text and deb[1]["meadow"] in text
  assert not (out / "demo").exists()


def test_a_demo_photo_must_be_a_redistributable_training_photo(tmp_path):
  m = manifest({n: "a" * 64 for n in FILES}, meadow={"licence": "GPL-2+"})
  path = tmp_path / "m.json"
  path.write_text(json.dumps(m))
  with pytest.raises(pc.CorpusError, match="demo photo"):
    pc.load_manifest(path)


def test_the_pinned_manifest():
  m = pc.load_manifest(pc.MANIFEST)
  photos = m["photos"]
  split = {s: [p for p in photos if p["split"] == s] for s in ("train", "heldout")}
  assert len(split["train"]) >= 32 and len(split["heldout"]) >= 10
  assert not any("mate-backgrounds" in json.dumps(p) for p in photos)
  assert "mate-backgrounds" not in m["packages"]
  # split by photo: no source file (by path or by content) is in both splits
  for key in ("sha256", "path"):
    train = {(p["package"], p[key]) if key == "path" else p[key] for p in split["train"]}
    held = {(p["package"], p[key]) if key == "path" else p[key] for p in split["heldout"]}
    assert not train & held


PHOTOS = ROOT / "hvq_jax" / "photos"
_ROW = re.compile(r"^\| `([a-z0-9_]+\.jpg)` \| (\d+)x(\d+) \| `([0-9a-f]{64})` \| "
                  r"(\S+) \S+ \| `([^`]+)` \| `([0-9a-f]{64})` \| ([^|]+) \|")


def test_shipped_demo_photos_match_sources_md():
  rows = [_ROW.match(l) for l in (PHOTOS / "SOURCES.md").read_text().splitlines()
          if l.startswith("| `")]
  assert rows and all(rows), "every table row of SOURCES.md parses"
  listed = {r.group(1): r for r in rows}
  assert sorted(listed) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
  assert 6 <= len(listed) <= 10
  assert sum(p.stat().st_size for p in PHOTOS.glob("*.jpg")) < 1.5e6
  pinned = {(p["package"], p["path"]): p for p in pc.load_manifest(pc.MANIFEST)["photos"]}
  for name, r in listed.items():
    with Image.open(PHOTOS / name) as im:
      im.load()
      assert im.format == "JPEG" and im.mode == "RGB"
      assert im.size == (int(r.group(2)), int(r.group(3)))
      assert 384 <= max(im.size) <= 512
    assert sha256(PHOTOS / name) == r.group(4)
    source = pinned[(r.group(5), r.group(6))]
    assert source["sha256"] == r.group(7) and source["split"] == "train"
    assert r.group(8).strip() in pc.REDISTRIBUTABLE
