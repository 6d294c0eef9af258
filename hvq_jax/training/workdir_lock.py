"""One writer per workdir: `hvq train` holds `<workdir>/train.lock` for as long as it runs.

The lock is a small JSON file naming its holder (host, pid, start time) with a lease the
holder renews (every `lease_s / 4`). A second `hvq train` on the same workdir refuses,
naming the holder. A stale lock is taken over with a warning: its holder's pid is gone on
this host, or (another host's holder) its lease has expired.

How the create-if-absent is made atomic, and its limits:
* Local folders: a fully written temp file hard-linked to the lock's name (atomic
  create-if-absent like `O_CREAT | O_EXCL`, which is the fallback where there are no hard
  links); renewing and taking over happen under `fcntl.flock` on `train.lock.guard`
  (read, check, replace in one critical section). This holds on local disks and on
  network file systems with atomic link/O_EXCL and working flock (NFSv4, Lustre mounted
  with flock); elsewhere two takers of one stale lock may race.
* URLs (gs://, s3://, file://): TensorStore's key-value store with a conditional write
  (`if_equal` the generation read: on GCS `ifGenerationMatch`), so creating, renewing and
  taking over are compare-and-swap on the object store itself.
* A holder that is stopped (SIGSTOP, a frozen VM) longer than the lease loses its lock to
  another host; it finds out at its next renewal or save (`check()`) and stops there.

Several processes: process 0 takes the lock before any process writes, and every process
learns the outcome (`hold`): a refusal stops them all.
"""
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Optional

LOCK_NAME = "train.lock"
LEASE_S = 300.0


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir (the message names it), or this run lost its lock."""


def _describe(h: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
  return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {started}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True
  return True


def stale_reason(h: Optional[dict], now: Optional[float] = None) -> Optional[str]:
  """Why the holder `h` no longer holds the lock, or None while it does."""
  if h is None:
    return "its file is unreadable"
  now = time.time() if now is None else now
  if h.get("host") == socket.gethostname():
    if not _pid_alive(h.get("pid", -1)):
      return f"pid {h.get('pid')} is gone"
    return None
  if float(h.get("lease_until", 0)) < now:
    return f"its lease expired {now - float(h['lease_until']):.0f} s ago"
  return None


def _parse(data) -> Optional[dict]:
  try:
    h = json.loads(data)
    return h if isinstance(h, dict) else None
  except (ValueError, TypeError, UnicodeDecodeError):
    return None


class _LocalStore:
  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> bool:
    """Create-if-absent with the whole content: a fully written temp file hard-linked to
    the lock's name (atomic like O_CREAT|O_EXCL, and never seen half-written); O_EXCL
    where the file system has no hard links."""
    tmp = self._write_tmp(data)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError:   # no hard links here (some FUSE / SMB mounts)
      pass
    finally:
      os.unlink(tmp)
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _write_tmp(self, data: bytes) -> str:
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def read(self) -> Optional[bytes]:
    try:
      with open(self.path, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def replace(self, expected: Optional[bytes], data: Optional[bytes]) -> bool:
    """Write `data` (None: delete) if the file still holds `expected`; under the guard."""
    import fcntl
    with open(self.path + ".guard", "a+") as g:
      fcntl.flock(g, fcntl.LOCK_EX)
      try:
        if self.read() != expected:
          return False
        if data is None:
          os.unlink(self.path)
          return True
        os.replace(self._write_tmp(data), self.path)
        return True
      finally:
        fcntl.flock(g, fcntl.LOCK_UN)


class _KvStore:
  """Compare-and-swap on one key of a TensorStore key-value store (a URL)."""

  def __init__(self, url: str):
    import tensorstore as ts
    base, self.key = url.rsplit("/", 1)
    self.store = ts.KvStore.open(base + "/").result()
    self._gen = None

  def _read(self):
    r = self.store.read(self.key).result()
    return (r.value if r.state == "value" else None), r.stamp.generation

  def read(self) -> Optional[bytes]:
    value, _ = self._read()
    return value

  def _write_if(self, generation, data) -> bool:
    out = self.store.write(self.key, data, if_equal=generation).result()
    return bool(out.generation)   # an unmet condition gives the unknown (empty) generation

  def create(self, data: bytes) -> bool:
    value, gen = self._read()
    return value is None and self._write_if(gen, data)

  def replace(self, expected: Optional[bytes], data: Optional[bytes]) -> bool:
    value, gen = self._read()
    return value == expected and self._write_if(gen, data)


def _store(path: str):
  return _KvStore(path) if "://" in path else _LocalStore(path)


class WorkdirLock:
  """The lock of one workdir (`acquire`, `check`, `release`; a context manager)."""

  def __init__(self, workdir: str, lease_s: float = LEASE_S, renew_s: Optional[float] = None):
    self.workdir = str(workdir).rstrip("/")
    self.path = f"{self.workdir}/{LOCK_NAME}"
    self.lease_s = float(lease_s)
    self.renew_s = self.lease_s / 4 if renew_s is None else float(renew_s)
    self._held: Optional[bytes] = None
    self._lost: Optional[str] = None
    self._stop = threading.Event()
    self._thread = None
    self.took_over: Optional[str] = None

  def _content(self, started: float) -> bytes:
    return json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), started=started,
                           lease_until=time.time() + self.lease_s,
                           token=self._token)).encode()

  def acquire(self) -> "WorkdirLock":
    if "://" not in self.workdir:
      os.makedirs(self.workdir, exist_ok=True)
    self._store = _store(self.path)
    self._token, self._started = uuid.uuid4().hex, time.time()
    for _ in range(5):   # a holder that releases while we look: try again
      data = self._content(self._started)
      if self._store.create(data):
        self._held = data
        break
      old = self._store.read()
      if old is None:
        continue
      h = _parse(old)
      why = stale_reason(h)
      if why is None:
        raise WorkdirLocked(f"{self.workdir} is in use by another training run ({_describe(h)}; "
                            f"lock {self.path}): wait for it to finish, or stop it (if no "
                            f"run uses this workdir, delete the lock)")
      if self._store.replace(old, data):
        self.took_over = (f"{self.workdir}: took over a stale lock "
                          f"({_describe(h) if h else 'unknown holder'}: {why})")
        warnings.warn(self.took_over, stacklevel=2)
        self._held = data
        break
    else:
      raise WorkdirLocked(f"{self.workdir}: could not take the lock {self.path} (it keeps "
                          f"changing hands)")
    self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _renew_loop(self):
    while not self._stop.wait(self.renew_s):
      self.renew()

  def renew(self) -> None:
    if self._held is None or self._lost:
      return
    data = self._content(self._started)
    try:
      ok = self._store.replace(self._held, data)
    except Exception as e:   # noqa: BLE001 (a storage hiccup: try again at the next renewal)
      warnings.warn(f"{self.path}: could not renew the lock ({e})")
      return
    if ok:
      self._held = data
    else:
      h = _parse(self._store.read() or b"")
      self._lost = f"{self.workdir}: this run lost its lock to " + (
          _describe(h) if h else "nobody (the lock file was removed)")

  def check(self) -> None:
    """Raise WorkdirLocked when another run has taken the lock (before writing)."""
    if self._lost:
      raise WorkdirLocked(self._lost)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
      self._thread = None
    if self._held is not None and not self._lost:
      try:
        self._store.replace(self._held, None)
      except OSError:
        pass
    self._held = None

  def __enter__(self):
    return self if self._held is not None else self.acquire()

  def __exit__(self, *exc):
    self.release()


class _Follower:
  """What processes other than 0 hold: nothing to renew or release."""

  def check(self) -> None:
    pass

  def release(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def hold(workdir: str, lease_s: float = LEASE_S):
  """The run's lock: taken by process 0, its outcome shared with every process (a refusal
  raises WorkdirLocked on all of them). Returns an object with check() and release()."""
  import jax
  if jax.process_count() == 1:
    return WorkdirLock(workdir, lease_s).acquire()
  import numpy as np
  from jax.experimental import multihost_utils
  lock, err = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, lease_s).acquire()
    except WorkdirLocked as e:
      err = e
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
  if err is not None:
    raise err
  if not ok:
    raise WorkdirLocked(f"{workdir}: process 0 could not take the workdir's lock (its "
                        f"output names the holder)")
  return lock if lock is not None else _Follower()
