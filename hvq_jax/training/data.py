"""Training data with grain: random-access sources -> random crops/flips -> colour
augmentation -> batches.

Deterministic per seed (grain derives each element's RNG from the seed and its index),
resumable (the iterator's state is saved in the checkpoint), and sharded by process:
each process reads only `source[process_index::process_count]`.

Feeding the device: `data.num_workers` grain worker processes decode and augment
batches (-1, the default: `auto_num_workers`), and `DevicePrefetch` puts the next
`data.device_prefetch - 1` batches on the mesh while the current step runs.
"""
import collections
import copy
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import grain
from PIL import Image

from hvq_jax import images
from hvq_jax.images import ImageFolder, InMemoryImages, TfdsImages


def make_source(data_cfg, split: str = "train"):
  kind = data_cfg.source
  if kind == "bundled":
    return InMemoryImages(list(images.bundled_photos(split).values()))
  if kind == "folder":
    return ImageFolder(data_cfg.train_dir if split == "train" else data_cfg.eval_dir)
  if kind == "tfds":
    return TfdsImages(data_cfg.tfds_name, data_cfg.tfds_split if split == "train"
                      else data_cfg.tfds_eval_split, data_cfg.tfds_data_dir)
  raise ValueError(f"config.data.source must be 'bundled', 'folder' or 'tfds', got {kind!r}")


class RandomCrop(grain.transforms.RandomMap):
  """Random rescale (scale in [min_scale, 1]), random crop to `size`, random h-flip.

  Images smaller than the crop are upscaled first so every example has the full size.
  """

  def __init__(self, size: int, min_scale: float = 1.0, flip: bool = True):
    self.size, self.min_scale, self.flip = size, min_scale, flip

  def random_map(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = self.size
    scale = rng.uniform(self.min_scale, 1.0) if self.min_scale < 1.0 else 1.0
    scale = max(scale, s / min(h, w))            # never crop outside the image
    win = min(int(round(s / scale)), h, w)
    top = int(rng.integers(0, h - win + 1))
    left = int(rng.integers(0, w - win + 1))
    crop = img[top:top + win, left:left + win]
    if win != s:
      crop = np.asarray(Image.fromarray(crop).resize((s, s), Image.Resampling.BICUBIC))
    if self.flip and rng.random() < 0.5:
      crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


# RGB <-> YIQ (NTSC): Y is luma, (I, Q) the chroma plane a hue rotation turns.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                 [0.211456, -0.522591, 0.311135]])
_RGB = np.linalg.inv(_YIQ)


class ColorJitter(grain.transforms.RandomMap):
  """Hue rotation (uniform in +-`hue_deg`), chroma scaling (uniform in 1 +- `saturation`)
  in YIQ, luma kept, then a random RGB channel permutation with probability `permute`.

  Ten bundled training photos with few greens and blues cannot teach a codebook the
  gamut: models trained on them decoded grass grey-beige and skies grey. Deterministic
  per seed and element, like the crops (grain gives each element its own RNG).
  """

  def __init__(self, hue_deg: float = 0.0, saturation: float = 0.0, permute: float = 0.0):
    self.hue, self.sat, self.permute = float(hue_deg), float(saturation), float(permute)

  def matrix(self, rng: np.random.Generator) -> np.ndarray:
    """The 3x3 colour transform (acting on RGB column vectors) for one element."""
    theta = np.deg2rad(rng.uniform(-self.hue, self.hue)) if self.hue else 0.0
    scale = rng.uniform(1.0 - self.sat, 1.0 + self.sat) if self.sat else 1.0
    c, s = np.cos(theta) * scale, np.sin(theta) * scale
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = _RGB @ chroma @ _YIQ
    if self.permute and rng.random() < self.permute:
      m = m[rng.permutation(3)]
    return m

  def random_map(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if not (self.hue or self.sat or self.permute):
      return img
    m = self.matrix(rng)
    out = np.asarray(img, np.float32) @ m.T.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def available_cores() -> int:
  """CPU cores this process may run on (a SLURM/cgroup CPU mask counts, not the node's)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


MAX_AUTO_WORKERS = 8


def auto_num_workers(platform: str, cores: int) -> int:
  """grain worker processes for data.num_workers=-1 ('auto').

  On an accelerator (gpu, tpu) the host cores are free while the device computes: one
  core stays with the training loop (dispatch, device puts, logging), the rest decode
  and augment, up to MAX_AUTO_WORKERS (a few workers feed thousands of images/s; more
  only cost memory: each worker holds a copy of the source and its buffered batches).

  On the CPU backend: 0. There XLA computes the step on the same cores, so a worker only
  takes cores from the step, and the pipeline is a small share of it: the tiny demo
  (configs/tiny_cpu.py, 2 cores) spends ~12 ms making a batch against ~500 ms of step, and
  the host makes the next batch while the step it dispatched runs (JAX dispatches
  asynchronously). Measured on 2 cores (tiny demo, `hvq train` loop, 100 steps): 0.86
  steps/s without workers, 0.88 with one, within the noise of the shared machine, and a
  worker costs its start-up (a spawned process importing jax and grain) and memory.
  """
  if platform == "cpu":
    return 0
  return max(0, min(cores - 1, MAX_AUTO_WORKERS))


def num_workers(data_cfg) -> int:
  """data.num_workers with -1 resolved by `auto_num_workers` for JAX's default backend."""
  n = int(data_cfg.num_workers)
  if n >= 0:
    return n
  if n != -1:
    raise ValueError(f"config.data.num_workers must be -1 (auto) or >= 0, got {n}")
  import jax
  return auto_num_workers(jax.default_backend(), available_cores())


def read_threads(data_cfg, workers: int) -> int:
  """Threads making batches in each worker, or in this process without workers.

  data.read_threads=-1 (auto): 2 in each worker (the workers are the parallelism); without
  workers, 2 on the CPU backend (XLA computes the step on the same cores) and
  min(16, cores) on an accelerator, where this process alone feeds the device (measured
  on an H100, tiny config at batch 32, 96 px: 2 threads made 480 images/s where the step
  runs 800-900, which grain's default 16 threads kept up with).
  """
  n = int(data_cfg.read_threads)
  if n >= 0:
    return n          # 0: each batch made when it is asked for, in the asking thread
  if n != -1:
    raise ValueError(f"config.data.read_threads must be -1 (auto) or >= 0, got {n}")
  if workers > 0:
    return 2
  import jax
  return 2 if jax.default_backend() == "cpu" else max(2, min(16, available_cores()))


def spawn_safe_main() -> bool:
  """Can worker processes be spawned from this program? grain starts them with 'spawn',
  which runs the main script again in each worker: a script without an
  `if __name__ == "__main__":` guard would start training there too, and the worker
  never starts (the parent waits for it forever). Judged from the script's text; `hvq`,
  `python -m pytest`, notebooks and `python -c` are safe."""
  import sys
  main = sys.modules.get("__main__")
  name = getattr(getattr(main, "__spec__", None), "name", None) or ""
  if name == "__main__" or name.endswith(".__main__"):
    return True       # a package's __main__ (python -m pytest): multiprocessing skips it
  path = getattr(main, "__file__", None)
  if not path:
    return True       # no script (notebook, python -c)
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "__main__" in f.read()
  except OSError:
    return True


def train_dataset(config, process_index: int = 0, process_count: int = 1) -> "TrainStream":
  """Infinite iterator of uint8 batches [B_local, S, S, 3], B_local = batch_size / processes."""
  batch = config.train.batch_size
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by {process_count} processes")
  src = make_source(config.data, "train")
  ds = grain.MapDataset.source(src)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = (ds.shuffle(seed=config.seed)
        .repeat(None)
        .random_map(RandomCrop(config.image_size, config.data.min_scale, config.data.flip),
                    seed=config.seed + 1)
        .random_map(ColorJitter(config.data.color_hue_deg,
                                config.data.color_saturation,
                                config.data.color_permute),
                    seed=config.seed + 2)
        .batch(batch // process_count, drop_remainder=True))
  workers = num_workers(config.data)
  if workers > 0 and not spawn_safe_main():
    msg = ("this script has no `if __name__ == \"__main__\":` guard, and grain's worker "
           "processes (spawned) would run it again")
    if int(config.data.num_workers) != -1:
      raise ValueError(f"config.data.num_workers={config.data.num_workers}: {msg}; add the "
                       f"guard around the script's code, or set data.num_workers=0")
    import warnings
    warnings.warn(f"data.num_workers=-1 (auto): no worker processes, {msg}", stacklevel=2)
    workers = 0
  return TrainStream(ds, workers, int(config.data.worker_buffer_size),
                     read_threads(config.data, workers))


def stream_position(state: Any) -> int:
  """Batches consumed, from a saved iterator state: ours and grain's in-process iterator's
  `{"next_index": N}`, or grain's mp_prefetch state (checkpoints of runs with workers made
  before TrainStream: per-worker counts of a round-robin, which add up to N)."""
  if isinstance(state, (bytes, bytearray)):
    state = state.decode()
  if isinstance(state, str):
    state = json.loads(state)
  if "next_index" in state:
    return int(state["next_index"])
  if "iterators_in_use_states" in state:
    return sum(stream_position(s) for s in state["iterators_in_use_states"])
  raise ValueError(f"not a training-data iterator state: {str(state)[:200]}")


class TrainStream:
  """The batches of a deterministic MapDataset from a position on, made in-process or by
  grain worker processes; its state is the position alone.

  Batch N is a function of the seed and N (grain derives each element's RNG from its
  index), so the stream restarts anywhere by slicing the dataset at N: the checkpointed
  state, `{"next_index": N}` (the text grain writes for its in-process iterator, so older
  checkpoints restore), does not depend on the number of workers, and a run may resume
  with another `data.num_workers` or on a host where 'auto' picks another count.
  Follows grain's Orbax handler protocol for objects that are not grain iterators
  (get_state -> bytes, set_state(bytes), start_prefetch).
  """

  def __init__(self, batches: grain.MapDataset, workers: int = 0, buffer_size: int = 2,
               read_threads: int = 2):
    self._ds, self._workers, self._buffer = batches, int(workers), int(buffer_size)
    self._threads = int(read_threads)
    self._pos = 0
    self._it = None

  @property
  def num_workers(self) -> int:
    return self._workers

  def __iter__(self):
    return self

  def start_prefetch(self):
    """Start making batches (workers start here): the first next() does it otherwise."""
    if self._it is not None:
      return
    # grain's default read options (16 threads, 500 elements ahead) are sized for single
    # examples; ours are whole batches (a default-config batch of 64 is 12.6 MB, so 500
    # of them 6.3 GB per process or worker). `read_threads` batches are made at once,
    # in this process or in each worker, and at most `buffer_size` of them wait.
    it = self._ds[self._pos:].to_iter_dataset(grain.ReadOptions(
        num_threads=self._threads,
        prefetch_buffer_size=max(self._buffer, self._threads)))
    if self._workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():
        # grain's multiprocessing reads its absl flags: outside an absl program (the
        # Python API, notebooks, tests) they are unparsed and mp_prefetch fails. Their
        # defaults are what it needs.
        flags.FLAGS.mark_as_parsed()
      # Each worker makes whole batches (of n workers, worker i makes batches i, i + n,
      # ...; grain hands them out in turn, so the stream is the same for any n) and keeps
      # `buffer_size` of them ready.
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=self._buffer))
    self._it = iter(it)

  def __next__(self) -> np.ndarray:
    self.start_prefetch()
    out = next(self._it)
    self._pos += 1
    return out

  def get_state(self) -> bytes:
    return json.dumps({"next_index": self._pos}, indent=4).encode()

  def set_state(self, state) -> None:
    self.close()
    self._pos = stream_position(state)

  def close(self):
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


class _SavedState:
  """An iterator state frozen at one step, for grain's CheckpointSave (get_state)."""

  def __init__(self, state: Any):
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class DevicePrefetch:
  """Batches put on the device mesh `depth - 1` steps ahead of the one being consumed.

  `next()` starts the host-to-device copy of the following batch(es) (`put`, e.g.
  Trainer.shard_batch: a jax.Array with the batch NamedSharding) before it hands over the
  current one, so the copy overlaps the step that is about to run; the order of `source` is
  kept. depth=1 puts each batch when it is asked for (no look-ahead).

  The source iterator runs ahead of the training steps, so its own state is not the
  state to checkpoint: `checkpoint_item()` is the source's state right after the batch
  last handed over (captured when it was read), as grain's CheckpointSave wants it.
  """

  def __init__(self, source: Iterator[np.ndarray], put: Callable[[np.ndarray], Any],
               depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._source, self._put, self._depth = source, put, int(depth)
    self._queue = collections.deque()
    self._exhausted = False
    self._state = copy.deepcopy(source.get_state())

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._depth and not self._exhausted:
      try:
        host = next(self._source)
      except StopIteration:   # a finite source: hand over what is queued, then stop
        self._exhausted = True
        break
      self._queue.append((self._put(host), copy.deepcopy(self._source.get_state())))
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> Any:
    """The source's state after the batches handed over so far."""
    return self._state

  def checkpoint_item(self) -> _SavedState:
    return _SavedState(self._state)
