"""Attention in query chunks (nn/layers.py `attention`, the PyTorch port's `attention`):
the plain formula's values and gradients, memory linear in the tokens, block parity."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax.nn import layers


def _plain(q, k, v):
  """softmax(q k^T / sqrt(C)) v in float64 numpy: the reference."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


def _qkv(t, c=8, b=2, seed=0):
  r = np.random.default_rng(seed)
  return tuple((2 * r.standard_normal((b, t, c))).astype(np.float32) for _ in range(3))


@pytest.mark.parametrize("t,chunk", [(100, 0), (100, 7), (100, 32), (100, 100), (64, 1000)])
def test_chunks_give_the_plain_formula(t, chunk):
  q, k, v = _qkv(t)
  got = jax.jit(lambda *a: layers.attention(*a, chunk))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), _plain(q, k, v), rtol=1e-5, atol=1e-5)


def test_gradients_match_torch_sdpa():
  torch = pytest.importorskip("torch")
  q, k, v = _qkv(50, seed=1)
  w = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, 16) * w)
  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  (out * torch.tensor(w, dtype=torch.float64)).sum().backward()
  for g, ref in zip(got, (tq.grad, tk.grad, tv.grad)):
    np.testing.assert_allclose(np.asarray(g), ref.numpy(), rtol=1e-4, atol=1e-4)


def _temp_bytes(f, *args):
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_with_tokens():
  """Forward and backward hold a few [chunk, T] float32 score blocks (the unchunked
  formula: two to three [T, T] matrices), so 4x the tokens takes about 4x the memory."""
  chunk, c = 256, 8
  sizes = {}
  for t in (2048, 8192):
    x = jax.ShapeDtypeStruct((1, t, c), jnp.float32)
    fwd = lambda q, k, v: layers.attention(q, k, v, chunk)
    bwd = jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, chunk)), argnums=(0, 1, 2))
    sizes[t] = (_temp_bytes(fwd, x, x, x), _temp_bytes(bwd, x, x, x))
    for got in sizes[t]:
      assert got < 6 * 4 * chunk * t, (t, got)
  for small, large in zip(sizes[2048], sizes[8192]):
    assert large < 6 * max(small, 1), sizes


def test_torch_chunks_give_sdpa():
  torch = pytest.importorskip("torch")
  from hvq_jax.interop import torch_layers
  q, k, v = (torch.from_numpy(a) for a in _qkv(100, seed=3))
  ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
  for chunk in (0, 7, 100, 1000):
    got = torch_layers.attention(q, k, v, chunk)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_spatially_normed_block_matches_the_pytorch_port():
  """The decoder's attention block (spatial norm on a code map) with several chunks, in
  flax and in the PyTorch port from the same weights (the export's key mapping)."""
  torch = pytest.importorskip("torch")
  from hvq_jax.interop import export, torch_layers
  r = np.random.default_rng(4)
  x = r.standard_normal((1, 6, 10, 16)).astype(np.float32)
  cond = r.standard_normal((1, 3, 5, 7)).astype(np.float32)
  block = layers.AttnBlock(4, chunk=16)   # 60 tokens: four chunks, the last one short
  params = block.init(jax.random.PRNGKey(0), x, cond)["params"]
  params = jax.tree.map(lambda a: a + 0.3 * np.sin(np.arange(a.size)).reshape(a.shape), params)
  ref = np.asarray(block.apply({"params": params}, x, cond))
  net = torch_layers.AttnBlock(16, 4, 7, chunk=16)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in export.flax_to_torch(params).items()})
  with torch.no_grad():
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(cond).permute(0, 3, 1, 2))
  np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), ref, rtol=1e-4, atol=1e-4)
