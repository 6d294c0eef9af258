"""Metrics of a run: JSON lines (always) and TensorBoard (tensorboardX), on process 0, to a
local folder or an object store."""
import io
import json
import time
from typing import Dict, Optional

import numpy as np
from etils import epath

from hvq_jax import checkpoint as ckpt_lib


def _step_of(line: str) -> Optional[int]:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None   # a line cut short by a kill


class _EpathRecordWriter:
  """A TensorBoard event file on an object store: the whole file is uploaded at each of
  tensorboardX's flushes (every 2 minutes) and at close, never after close."""

  def __init__(self, path: str):
    self.path, self.buffer, self.closed = epath.Path(path), io.BytesIO(), False

  def write(self, data: bytes):
    self.buffer.write(data)

  def flush(self):
    if not self.closed:
      self.path.write_bytes(self.buffer.getvalue())

  def close(self):
    self.flush()
    self.closed = True


class _EpathRecordWriterFactory:
  def open(self, path):
    return _EpathRecordWriter(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_through_epath(scheme: str) -> None:
  """tensorboardX's own gs:// writer re-uploads from __del__ after close (and retries for
  minutes once the store is gone): write event files through etils.epath instead."""
  from tensorboardX import record_writer
  record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())


class MetricWriter:
  """JSON lines (always) + TensorBoard (tensorboardX) on process 0 only.

  `workdir` may be a URL (gs://): object stores cannot append, so there the lines are kept
  in memory and the whole object is rewritten at most every `flush_secs` and at every
  checkpoint and at the end. Lines logged after `resume_step` (by a run killed before its
  next checkpoint) are dropped, so a resumed run's file has each step once.
  """

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0, flush_secs: float = 60.0):
    self.enabled = enabled
    self.tb = None
    self._jsonl = None
    if not enabled:
      return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self.path = root / "metrics.jsonl"
    self.url = ckpt_lib.is_url(workdir)
    self.flush_secs, self._last_flush, self._dirty = flush_secs, time.time(), False
    old = self.path.read_text().splitlines() if self.path.exists() else []
    keep = lambda l: (lambda s: s is not None and s <= resume_step)(_step_of(l))
    self.lines = [l for l in old if keep(l)]
    if len(self.lines) != len(old):
      self.path.write_text("".join(l + "\n" for l in self.lines))
    if not self.url:
      self._jsonl = open(self.path, "a")
      self.lines = None
    try:
      from tensorboardX import SummaryWriter
      if self.url:
        _tensorboard_through_epath(str(workdir).split(":", 1)[0])
      self.tb = SummaryWriter(ckpt_lib.join(workdir, "tb"))
    except ImportError:
      pass
    except Exception as e:   # noqa: BLE001 (TensorBoard is optional)
      print(f"TensorBoard logging off ({type(e).__name__}: {e}); metrics.jsonl has every value")

  def scalars(self, step: int, values: Dict[str, float]):
    if not self.enabled:
      return
    line = json.dumps(dict(step=int(step), **values))
    if self._jsonl is not None:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()
    else:
      self.lines.append(line)
      self._dirty = True
      if time.time() - self._last_flush >= self.flush_secs:
        self.flush()
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def flush(self):
    if self.enabled and self._jsonl is None and self._dirty:
      self.path.write_text("".join(l + "\n" for l in self.lines))
      self._dirty, self._last_flush = False, time.time()

  def images(self, step: int, name: str, grid: np.ndarray):
    if self.enabled and self.tb:
      self.tb.add_image(name, grid, step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self.flush()
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
      if self.tb:
        self.tb.close()
        self.tb = None
