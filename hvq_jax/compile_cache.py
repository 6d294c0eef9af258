"""JAX's persistent compilation cache: compile a program once per machine, not per process.

Compiling is most of a short command's time (`hvq decompress` of one photo: ~1 s of
work after ~10 s of compiling on a 2-core CPU) and the first minutes of every training
restart, preemption resume and sweep run. The cache directory is, in order:
$JAX_COMPILATION_CACHE_DIR, the `directory` passed (training: under its workdir), or
the user cache (`$XDG_CACHE_HOME/hvq_jax/jax`, default ~/.cache/hvq_jax/jax).
`HVQ_NO_COMPILATION_CACHE=1` turns it off.

JAX's cache still traces and lowers a program before it can look it up (~1 s for the
decoder on a 2-core CPU, more than the lookup saves on a small image). The codec's
programs therefore go through `executable`, which keeps the compiled executable itself
under `<cache>/hvq_executables/`, named by everything that decides the program (see
`executable`), and loads it without tracing, lowering or importing flax.
"""
import functools
import hashlib
import os
import pickle
import tempfile
import zlib
from typing import Any, Callable, Dict, Optional

_enabled: Dict[str, Optional[str]] = {"dir": None}   # what enable() last pointed JAX at
_memo: Dict[str, Any] = {}                           # this process's executables by key
EXECUTABLES = "hvq_executables"


def default_directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hvq_jax", "jax")


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Point JAX's persistent cache at a directory (created if local); returns it, or None
  when turned off. Programs that compile in under 0.5 s are not cached (not worth a file)."""
  import jax
  if os.environ.get("HVQ_NO_COMPILATION_CACHE"):
    _enabled["dir"] = None
    return None
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory or default_directory()
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _enabled["dir"] = path
  return path


def executable_directory() -> Optional[str]:
  """Where `executable` keeps compiled programs: inside the local directory `enable` set,
  while JAX still uses it; None otherwise (then `executable` is a plain jax.jit)."""
  import jax
  d = _enabled["dir"]
  if d is None or "://" in d or jax.config.jax_compilation_cache_dir != d:
    return None
  return os.path.join(d, EXECUTABLES)


_SOURCE_DIGEST: Dict[str, str] = {}


# What the codec's programs are traced from (the networks, the entropy code, the layout,
# the codec and this file); editing any other module (training, evaluation, the CLI) keeps
# the executables.
_TRACED_SOURCES = ("nn", "entropy", "codec", "layout.py", "compile_cache.py")


def _source_digest() -> str:
  """sha256 of the package sources the programs are traced from: a changed model or codec
  makes new programs."""
  if "v" not in _SOURCE_DIGEST:
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    paths = []
    for entry in _TRACED_SOURCES:
      p = os.path.join(root, entry)
      if os.path.isdir(p):
        paths += [os.path.join(d, f) for d, _, files in os.walk(p) for f in files
                  if f.endswith(".py")]
      elif os.path.exists(p):
        paths.append(p)
    for p in sorted(paths):
      h.update(os.path.relpath(p, root).encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
    _SOURCE_DIGEST["v"] = h.hexdigest()
  return _SOURCE_DIGEST["v"]


@functools.lru_cache(maxsize=None)
def _environment() -> str:
  """What besides the program decides its machine code: versions, device, flags, CPU."""
  import importlib.metadata
  import jax
  import jaxlib
  dev = jax.devices()[0]
  parts = [jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
           str(dev.client.platform_version), str(len(jax.devices())),
           os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
           str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
           _source_digest()]
  for pkg in ("flax", "numpy"):
    try:
      parts.append(importlib.metadata.version(pkg))
    except importlib.metadata.PackageNotFoundError:
      parts.append("-")
  if dev.platform == "cpu":   # XLA:CPU compiles for this host's instruction set
    try:
      with open("/proc/cpuinfo") as f:
        parts.append(next((l for l in f if l.startswith(("flags", "Features"))), ""))
    except OSError:
      import platform
      parts.append(platform.machine() + platform.processor())
  return "\n".join(parts)


def _signature(args) -> str:
  import jax
  leaves, tree = jax.tree.flatten(args)
  out = [str(tree)]
  for a in leaves:
    t = jax.typeof(a)
    sh = getattr(a, "sharding", None)
    out.append(f"{t.str_short()} weak={t.weak_type} "
               f"{sorted(d.id for d in sh.device_set) if sh is not None else ''}")
  return "\n".join(out)


class _Loaded:
  """A deserialised executable that falls back to `jax.jit(fn)` (and drops the file) if
  its first run fails: a file from another build of XLA that loaded but cannot run."""

  def __init__(self, compiled, make_fn: Callable, path: str):
    self.compiled, self.make_fn, self.path, self.checked = compiled, make_fn, path, False

  def __call__(self, *args):
    if self.checked:
      return self.compiled(*args)
    import jax
    try:
      out = self.compiled(*args)
      jax.block_until_ready(out)
    except jax.errors.JaxRuntimeError:
      _remove(self.path)
      _mark_broken(self.path)   # executables do not survive a round trip here: stop making them
      self.compiled = jax.jit(self.make_fn())
      out = self.compiled(*args)
    self.checked = True
    return out


def _renamed(fn: Callable, name: str) -> Callable:
  def program(*args):
    return fn(*args)
  program.__name__ = program.__qualname__ = name
  return program


def _mark_broken(path: str) -> None:
  """`executable` uses plain jax.jit (and JAX's cache) for this program from now on."""
  try:
    with open(path + ".broken", "w"):
      pass
  except OSError:
    pass


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass


def executable(name: str, make_fn: Callable[[], Callable], args: tuple, key: str = ""):
  """`jax.jit(make_fn())` compiled for `args`, called like it (with arrays shaped as
  `args`). With `enable`'s cache on, the executable is written once to
  `<cache>/hvq_executables/` and later processes load it instead of tracing, lowering
  and looking it up in JAX's cache. Its file name hashes `name`, `key` (what the caller's
  program depends on beyond the argument shapes: the model config, static sizes), the
  argument tree, shapes, dtypes and devices, the jax/jaxlib/flax/numpy versions, the
  device, XLA_FLAGS, the CPU's instruction set and this package's sources.
  `make_fn` is called only when the program has to be traced.

  Why pickle: `serialize_executable` returns PyTreeDefs, which JAX documents pickling;
  these files are a private cache this package writes in the user's own cache folder and
  keys by machine and versions, never a format to load from elsewhere (checkpoints and
  exports are Orbax and safetensors).
  """
  import jax
  d = executable_directory()
  sig = hashlib.sha256("\n--\n".join([name, key, _signature(args)]).encode()).hexdigest()
  memo_key = f"{d}:{sig}"
  if memo_key in _memo:
    return _memo[memo_key]
  path = None
  if d is not None:
    digest = hashlib.sha256(f"{sig}\n{_environment()}".encode()).hexdigest()[:32]
    path = os.path.join(d, f"{name}-{digest}.pkl")
  if path is None or os.path.exists(path + ".broken"):
    fn = jax.jit(make_fn())
    _memo[memo_key] = fn
    return fn
  from jax.experimental import serialize_executable as se
  leaves = [a for a in jax.tree.leaves(args) if isinstance(a, jax.Array)]
  devices = sorted({dv for a in leaves for dv in a.sharding.device_set}, key=lambda dv: dv.id)
  devices = devices or [jax.devices()[0]]
  if os.path.exists(path):
    try:
      with open(path, "rb") as f:
        payload, in_tree, out_tree = pickle.loads(zlib.decompress(f.read()))
      fn = _Loaded(se.deserialize_and_load(payload, in_tree, out_tree,
                                           execution_devices=devices), make_fn, path)
    except Exception:   # not loadable here: plain jax.jit from now on (JAX's cache)
      _remove(path)
      _mark_broken(path)
      fn = jax.jit(make_fn())
    _memo[memo_key] = fn
    return fn
  # Compiled here, never taken from JAX's cache: an executable that JAX loaded from its
  # cache serialises without its kernels on XLA:CPU (jax 0.10: "Function ... not found"
  # once loaded). The program gets a name of its own (so a cache key, and an in-memory
  # entry, that no plain jax.jit of `make_fn()` shares: same computation, same machine
  # code), and with the minimum compile time out of reach JAX never stores it.
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
  try:
    fn = jax.jit(_renamed(make_fn(), f"hvq_executable_{name}")).lower(*args).compile()
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
  try:
    blob = zlib.compress(pickle.dumps(se.serialize(fn)), 1)
  except Exception:   # not serialisable on this backend: plain jax.jit from now on
    _mark_broken(path)
    blob = None
  if blob is not None:
    try:
      os.makedirs(d, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pkl")
      try:
        with os.fdopen(fd, "wb") as f:
          f.write(blob)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)   # like JAX's own cache files (mkstemp makes 0600)
        os.replace(tmp, path)
      except BaseException:
        _remove(tmp)
        raise
    except OSError:   # a read-only cache: run it uncached
      pass
  _memo[memo_key] = fn
  return fn
