"""`hvq compress`/`decompress` file hygiene: output modes follow the umask, and two inputs
that would write one output are refused."""
import os
import stat

import pytest
from PIL import Image

from hvq_jax import cli, images


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
  def set_mask(mask):
    os.umask(mask)
  old = os.umask(0o022)
  yield set_mask
  os.umask(old)


def test_outputs_honour_the_umask(micro_ckpt, tmp_path, umask):
  src = tmp_path / "in.png"
  Image.fromarray(images.bundled_photo("coffee")[:32, :48]).save(src)
  for mask in (0o022, 0o027):
    umask(mask)
    ref = tmp_path / f"ref{mask:o}"
    ref.write_bytes(b"")             # what any other tool creates under this umask
    hvq, png = tmp_path / f"a{mask:o}.hvq", tmp_path / f"a{mask:o}.png"
    assert cli.main(["compress", str(src), "-o", str(hvq), "--checkpoint", micro_ckpt,
                     "--no-progress"]) == 0
    assert cli.main(["decompress", str(hvq), "-o", str(png), "--checkpoint", micro_ckpt,
                     "--no-progress"]) == 0
    assert _mode(hvq) == _mode(png) == _mode(ref) == 0o666 & ~mask
  assert _mode(tmp_path / "a22.hvq") == 0o644


def test_two_inputs_for_one_output_are_refused(tmp_path, capsys):
  d = tmp_path / "in"
  d.mkdir()
  img = images.bundled_photo("coffee")[:16, :16]
  Image.fromarray(img).save(d / "a.png")
  Image.fromarray(img).save(d / "a.jpg")
  Image.fromarray(img).save(d / "b.png")
  out = tmp_path / "out"
  # The refusal comes before the checkpoint is even looked at.
  with pytest.raises(SystemExit) as e:
    cli.main(["compress", str(d), "-o", str(out), "--checkpoint", str(tmp_path / "none")])
  msg = str(e.value.code)
  assert "a.jpg" in msg and "a.png" in msg and "a.hvq" in msg
  assert not out.exists()
  # The same name in two input folders.
  d2 = tmp_path / "in2"
  d2.mkdir()
  Image.fromarray(img).save(d2 / "b.png")
  os.remove(d / "a.jpg")
  with pytest.raises(SystemExit, match="b.png and .*b.png would both be written to .*b.hvq"):
    cli.main(["compress", str(d), str(d2), "-o", str(out), "--checkpoint", str(tmp_path / "none")])
  # Different stems pass this check (and then fail on the missing checkpoint).
  os.remove(d2 / "b.png")
  with pytest.raises(SystemExit, match="no such checkpoint|none"):
    cli.main(["compress", str(d), "-o", str(out), "--checkpoint", str(tmp_path / "none")])


def _folder(tmp_path, bad=("broken.png",)):
  d = tmp_path / "in"
  d.mkdir()
  for i, name in enumerate(("coffee", "chelsea", "rocket")):
    Image.fromarray(images.bundled_photo(name)[:32, 8 * i:8 * i + 48]).save(d / f"{name}.png")
  for name in bad:
    (d / name).write_bytes(b"not an image")
  return d


def _coded_folder(ckpt, d, out, jobs, capsys):
  code = cli.main(["compress", str(d), "-o", str(out), "--checkpoint", ckpt,
                   "--no-progress", "--jobs", str(jobs)])
  return code, capsys.readouterr().err


def test_a_folder_reports_every_failure_at_the_end(micro_ckpt, tmp_path, capsys):
  d = _folder(tmp_path, bad=("a_broken.png", "z_broken.png"))
  code, err = _coded_folder(micro_ckpt, d, tmp_path / "out", 1, capsys)
  assert code == 1
  assert sorted(os.listdir(tmp_path / "out")) == ["chelsea.hvq", "coffee.hvq", "rocket.hvq"]
  lines = err.strip().splitlines()
  assert lines[0] == "hvq compress: 2 of 5 files failed:"
  assert "a_broken.png" in lines[1] and "z_broken.png" in lines[2]


def test_images_too_large_for_a_worker_are_coded_alone():
  from hvq_jax import jobs
  done = []

  class Fake:
    budget = lambda self: 10.0
    need = lambda self, path: {"big": 8.0, "odd": None}.get(path, 1.0)
    def __call__(self, path, out):
      done.append(path)
      if path == "odd":
        raise ValueError("cannot read odd")

  pooled = []
  real_pool = jobs._pool
  jobs._pool = lambda j, idx, *a: pooled.extend(j[i][0] for i in idx) or {}
  try:
    failed = jobs.run(Fake(), [("a", "1"), ("big", "2"), ("odd", "3"), ("b", "4")], 2, ())
  finally:
    jobs._pool = real_pool
  assert pooled == ["a", "odd", "b"] and done == ["big"] and failed == []
  assert jobs.run(Fake(), [("big", "1"), ("odd", "2")], 1, ()) == [("odd", "cannot read odd")]
  assert jobs.core_groups(2, [0, 1, 2]) == [[0, 2], [1]]
  assert jobs.core_groups(4, [5]) == [[5]]


@pytest.mark.slow
def test_a_folder_in_worker_processes_matches_one_at_a_time(micro_ckpt, tmp_path, capsys):
  d = _folder(tmp_path)
  one = _coded_folder(micro_ckpt, d, tmp_path / "one", 1, capsys)
  two = _coded_folder(micro_ckpt, d, tmp_path / "two", 2, capsys)
  assert one[0] == two[0] == 1 and "broken.png" in two[1]
  for name in ("chelsea.hvq", "coffee.hvq", "rocket.hvq"):
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
