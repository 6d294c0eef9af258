"""JAX's persistent compilation cache: compile a program once per machine, not per process.

Compiling is most of a short command's time (`hvq decompress` of one photo: ~1 s of
work after ~10 s of compiling on a 2-core CPU) and the first minutes of every training
restart, preemption resume and sweep run. The cache directory is, in order:
$JAX_COMPILATION_CACHE_DIR, the `directory` passed (training: under its workdir), or
the user cache (`$XDG_CACHE_HOME/hvq_jax/jax`, default ~/.cache/hvq_jax/jax).
`HVQ_NO_COMPILATION_CACHE=1` turns it off.
"""
import os
from typing import Optional

import jax


def default_directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hvq_jax", "jax")


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Point JAX's persistent cache at a directory (created if local); returns it, or None
  when turned off. Programs that compile in under 0.5 s are not cached (not worth a file)."""
  if os.environ.get("HVQ_NO_COMPILATION_CACHE"):
    return None
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory or default_directory()
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
