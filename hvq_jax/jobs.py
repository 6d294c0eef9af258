"""Coding many files: several at once in worker processes where one image does not fill
the machine, one at a time (every core on it) where it does.

XLA's CPU programs use every core for one large image, but a small one leaves most of
them waiting (`docs/benchmarks.md`, folder throughput): a folder of small images is coded
by one worker process per group of cores, each pinned to its group, with the model loaded
once per worker. An image whose estimated memory (`codec/memory.py`) exceeds its share
of the budget (budget / workers) is coded afterwards in this process, alone. One file's
error never stops the others: `run` returns them all.
"""
import concurrent.futures as cf
import multiprocessing
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

Job = Tuple[str, str]   # (input path, output path)


def cores() -> List[int]:
  """The cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def core_groups(n_workers: int, available: Sequence[int]) -> List[List[int]]:
  """`available` split into `n_workers` groups of (nearly) equal size."""
  n = max(1, min(n_workers, len(available)))
  return [list(available[i::n]) for i in range(n)]


class Coder:
  """One process's model and the work of one file (compress: image -> .hvq; decompress:
  .hvq -> PNG), written atomically."""

  def __init__(self, cmd: str, checkpoint: str, backend: str = "jax",
               options: Optional[dict] = None, budget_gb: float = 0.0):
    from hvq_jax import codec
    self.cmd, self.options = cmd, dict(options or {})
    step = self.options.pop("step", None)   # which checkpoint step, not a coding option
    if cmd == "decompress" and backend == "torch":
      from hvq_jax.interop import export, torch_model
      net = torch_model.from_safetensors(checkpoint)
      net.coding = export.load_coding(checkpoint)
      self.model = None
      self._decode = lambda data: torch_model.decompress(net, data)
    else:
      self.model = codec.load_model(checkpoint, step)
      if budget_gb > 0:
        self.model.codec["memory_budget_gb"] = budget_gb
      self._decode = lambda data: codec.decompress(self.model, data)

  def need(self, path: str) -> Optional[float]:
    """Estimated peak bytes of coding `path`; None when its size cannot be read here (the
    work itself then reports why) or there is no JAX model to estimate for."""
    if self.model is None:
      return None
    from hvq_jax import layout
    from hvq_jax.codec import memory
    try:
      if self.cmd == "compress":
        from PIL import Image
        with Image.open(path) as im:
          w, h = im.size
      else:
        from hvq_jax.entropy import bitstream
        with open(path, "rb") as f:
          header = bitstream.unpack(f.read())[0]
        h, w = header.height, header.width
    except Exception:   # unreadable here: the work reports it by name
      return None
    hp, wp = layout.padded_size(h, w, self.model.cfg.strides[0])
    est = memory.memory_estimate(self.model.cfg, hp, wp)
    return est["decode"] if self.cmd == "decompress" else max(est["encode"], est["decode"])

  def budget(self) -> float:
    from hvq_jax.codec import memory
    return memory.memory_budget(self.model)[0] if self.model is not None else 0.0

  def __call__(self, path: str, out: str) -> None:
    from hvq_jax import codec, images
    from hvq_jax.cli.codec import atomic_write
    o = self.options
    if self.cmd == "compress":
      data = codec.compress(self.model, images.read_image(path), lmbda=o.get("lmbda"),
                            ratios=o.get("ratios"), target_bpp=o.get("target_bpp"),
                            colour=o.get("colour", True))
      def write(tmp):
        with open(tmp, "wb") as f:
          f.write(data)
    else:
      from PIL import Image
      with open(path, "rb") as f:
        img = self._decode(f.read())
      write = lambda tmp: Image.fromarray(img).save(tmp, format="PNG")
    atomic_write(out, write)


def _expected_errors():
  from hvq_jax import images
  from hvq_jax.entropy.bitstream import BitstreamError
  return (BitstreamError, images.ImageError, OSError, ValueError)   # ConfigError too


def attempt(coder: Coder, path: str, out: str) -> Optional[str]:
  """None, or the one-line reason this file was not coded."""
  try:
    coder(path, out)
    return None
  except _expected_errors() as e:
    return str(e)
  except MemoryError:
    return "out of memory: downscale or tile it"


_WORKER: Dict[str, Coder] = {}


def _init_worker(groups, counter, lock, args):
  with lock:
    i = counter.value
    counter.value += 1
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, groups[i % len(groups)])   # before jax sizes its thread pool
  from hvq_jax import compile_cache
  compile_cache.enable()
  _WORKER["coder"] = Coder(*args)


def _work(path: str, out: str) -> Optional[str]:
  return attempt(_WORKER["coder"], path, out)


def run(coder: Coder, jobs: Sequence[Job], workers: int, coder_args: tuple,
        progress: Callable[[], None] = lambda: None) -> List[Tuple[str, str]]:
  """Code every job; returns [(path, reason)] of those that failed, in input order.

  With `workers` > 1 and several jobs, those whose memory fits budget / workers go to
  that many pinned worker processes (spawned, each building `Coder(*coder_args)` with
  that share of the budget); the rest, and all of them with one worker, are coded here.
  `progress()` is called once per finished job."""
  errors: Dict[int, str] = {}
  local = list(range(len(jobs)))
  workers = min(workers, len(jobs))
  if workers > 1:
    budget = coder.budget()
    share = budget / workers
    needs = [coder.need(p) for p, _ in jobs]
    pooled = [i for i, n in enumerate(needs) if n is None or n <= share]
    local = [i for i in local if i not in set(pooled)]
    if len(pooled) > 1:
      errors.update(_pool(jobs, pooled, workers, coder_args, share, progress))
    else:
      local = sorted(local + pooled)
  for i in local:
    why = attempt(coder, *jobs[i])
    if why is not None:
      errors[i] = why
    progress()
  return [(jobs[i][0], errors[i]) for i in sorted(errors)]


def _pool(jobs, pooled, workers, coder_args, share, progress) -> Dict[int, str]:
  ctx = multiprocessing.get_context("spawn")
  groups = core_groups(workers, cores())
  counter, lock = ctx.Value("i", 0), ctx.Lock()
  args = tuple(coder_args[:4]) + (share / 1e9,)
  errors = {}
  with cf.ProcessPoolExecutor(len(groups), mp_context=ctx, initializer=_init_worker,
                              initargs=(groups, counter, lock, args)) as ex:
    futures = {ex.submit(_work, *jobs[i]): i for i in pooled}
    for f in cf.as_completed(futures):
      i = futures[f]
      try:
        why = f.result()
      except Exception as e:   # a worker that died (killed, out of memory) or failed to start
        why = f"worker process failed ({type(e).__name__}: {e})"
      if why is not None:
        errors[i] = why
      progress()
  return errors
