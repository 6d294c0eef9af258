"""The persistent compilation cache helper: where it points, and that it can be turned off."""
import jax

from hvq_jax import compile_cache


def test_cache_directory_rules(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.enable() == str(tmp_path / "xdg" / "hvq_jax" / "jax")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "hvq_jax" / "jax")
    assert (tmp_path / "xdg" / "hvq_jax" / "jax").is_dir()
    assert compile_cache.enable(str(tmp_path / "wd" / "jax_cache")) == str(tmp_path / "wd" / "jax_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.enable(str(tmp_path / "wd")) == str(tmp_path / "env")   # env wins
    assert compile_cache.enable("gs://bucket/run/jax_cache") == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compile_cache.enable("gs://bucket/run/jax_cache") == "gs://bucket/run/jax_cache"
    monkeypatch.setenv("HVQ_NO_COMPILATION_CACHE", "1")
    jax.config.update("jax_compilation_cache_dir", before)
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
