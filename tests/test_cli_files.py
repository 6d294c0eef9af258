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
