"""The tensors-only torch file reader against torch.load, on files torch writes here."""
import pickle
import zipfile

import numpy as np
import pytest

from hvq_jax.interop import torch_pickle

torch = pytest.importorskip("torch", reason="torch writes the reference files")


def _tensors():
  g = torch.Generator().manual_seed(0)
  return {
      "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
      "transposed": torch.randn(3, 4, 5, generator=g).transpose(0, 2),   # non-contiguous
      "strided": torch.arange(20)[3:17:3],                               # storage offset
      "half": torch.randn(6, generator=g).half(),
      "double": torch.randn(2, 2, generator=g).double(),
      "steps": torch.tensor(7),                                          # 0-d long
      "flags": torch.tensor([True, False]),
      "param": torch.nn.Parameter(torch.ones(3)),
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load(tmp_path, zip_format):
  sd = _tensors()
  path = str(tmp_path / "w.pt")
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  ref = torch.load(path, weights_only=True)
  got = torch_pickle.load(path)
  assert set(got) == set(ref)
  for k, v in ref.items():
    want = v.detach().numpy()
    assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want)


def test_module_state_dict_with_metadata(tmp_path):
  m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  torch.save(m.state_dict(), tmp_path / "m.pth")
  sd = torch_pickle.load_state_dict(str(tmp_path / "m.pth"))
  assert list(sd) == list(m.state_dict())
  np.testing.assert_array_equal(sd["0.weight"], m.state_dict()["0.weight"].numpy())


class _Evil:
  def __reduce__(self):
    return (print, ("pwned",))


def test_refuses_code(tmp_path):
  torch.save({"x": torch.ones(2), "y": _Evil()}, tmp_path / "zip.pt")
  with pytest.raises(torch_pickle.TorchFileError, match="only tensors"):
    torch_pickle.load(str(tmp_path / "zip.pt"))
  torch.save({"x": torch.ones(2), "y": _Evil()}, tmp_path / "legacy.pt",
             _use_new_zipfile_serialization=False)
  with pytest.raises(torch_pickle.TorchFileError, match="only tensors"):
    torch_pickle.load(str(tmp_path / "legacy.pt"))
  with open(tmp_path / "plain.pkl", "wb") as f:
    pickle.dump(_Evil(), f)
  with pytest.raises(torch_pickle.TorchFileError):
    torch_pickle.load(str(tmp_path / "plain.pkl"))


def test_damaged_files(tmp_path):
  torch.save({"x": torch.ones(100)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
  raw = (tmp_path / "l.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(raw[:-40])
  with pytest.raises(torch_pickle.TorchFileError, match="truncated"):
    torch_pickle.load(str(tmp_path / "cut.pt"))
  (tmp_path / "text.pt").write_text("not a checkpoint")
  with pytest.raises(torch_pickle.TorchFileError, match="not a torch file"):
    torch_pickle.load(str(tmp_path / "text.pt"))
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("a.txt", "x")
  with pytest.raises(torch_pickle.TorchFileError, match="data.pkl"):
    torch_pickle.load(str(tmp_path / "other.zip"))
  torch.save([torch.ones(1)], tmp_path / "list.pt")
  with pytest.raises(torch_pickle.TorchFileError, match="state dict"):
    torch_pickle.load_state_dict(str(tmp_path / "list.pt"))
