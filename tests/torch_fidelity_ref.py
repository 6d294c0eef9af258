"""torch-fidelity 0.4.0's Inception feature extractor and KID, loaded without torchvision.

The package's __init__ (and its utils module) import torchvision, which does not exist
here; the files under test need only torch. So the submodules are imported under a bare
package object with a stub `torch_fidelity.utils`, and sys.modules is restored after.
"""
import importlib
import importlib.util
import sys
import types

_CACHE = {}


def modules():
  """(feature_extractor_inceptionv3, interpolate_compat_tensorflow, metric_kid, metric_fid)."""
  if _CACHE:
    return _CACHE["mods"]
  import pytest
  pytest.importorskip("torch", reason="torch-fidelity is PyTorch")
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity not installed (pip install --no-deps torch-fidelity==0.4.0)")
  before = set(sys.modules)
  saved = {k: sys.modules[k] for k in before if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
  pkg = types.ModuleType("torch_fidelity")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = pkg
  utils = types.ModuleType("torch_fidelity.utils")
  for n in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
            "resolve_feature_extractor", "resolve_feature_layer_for_metric",
            "get_cacheable_input_name", "cache_lookup_one_recompute_on_miss"):
    setattr(utils, n, None)   # used only by the file-level helpers we do not call
  sys.modules["torch_fidelity.utils"] = utils
  try:
    names = ("feature_extractor_inceptionv3", "interpolate_compat_tensorflow", "metric_kid",
             "metric_fid")
    mods = tuple(importlib.import_module(f"torch_fidelity.{n}") for n in names)
  finally:
    for k in set(sys.modules) - before:
      if k == "torch_fidelity" or k.startswith("torch_fidelity."):
        del sys.modules[k]
    sys.modules.update(saved)
  _CACHE["mods"] = mods
  return mods


def random_inception(path, seed=0, legacy=False):
  """torch-fidelity's FeatureExtractorInceptionV3 with random weights, saved to `path`.

  Its constructor insists on loading weights: the load is skipped, BatchNorm gets random
  affine parameters and running statistics calibrated on one random batch (so features
  stay O(1) through 90 layers instead of vanishing), and the state dict is saved.
  """
  import torch
  fe = modules()[0]
  cls = fe.FeatureExtractorInceptionV3
  orig_load, orig_url = cls.load_state_dict, fe.load_state_dict_from_url
  cls.load_state_dict = lambda self, sd, *a, **k: None
  fe.load_state_dict_from_url = lambda *a, **k: None
  torch.manual_seed(seed)
  try:
    m = cls("inception-v3-compat", ["2048"])
  finally:
    cls.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
  g = torch.Generator().manual_seed(seed)
  for bn in [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]:
    bn.weight.data = torch.rand(bn.weight.shape, generator=g) + 0.5
    bn.bias.data = torch.randn(bn.bias.shape, generator=g) * 0.1
    bn.momentum = None
    bn.reset_running_stats()
  m.train()
  with torch.no_grad():
    m((torch.rand(4, 3, 299, 299, generator=g) * 255).to(torch.uint8))
  m.eval()
  torch.save(m.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  return m
