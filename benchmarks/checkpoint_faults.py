"""Damage real checkpoints at random, then resume and load them: classify every outcome.

  nice -n 5 python benchmarks/checkpoint_faults.py --n 1000 [--seed 0] [--run DIR] \
      [--out benchmarks/results/checkpoint_faults.json] [--cli] [--replay FAILURES.json]

The run: a tiny real training run of the micro model (configs/micro.py's train_config:
64 px, batch 2, two steps) with checkpoints at steps 0 and 2, made once (or `--run`, a
workdir such a run left). Its intact steps are restored once: the reference every case is
compared with.

Per case: copy the checkpoints folder, damage the copy (`FAULTS`: bit flips, a run of 64
inverted bytes, truncation, zeroing, deleting a file, deleting a folder, in every kind of
file of a step, `KINDS`; mostly in the newest step, sometimes in the older one or both;
or a leftover unfinished save; or a lock held by another writer, live or stale), then in
this process:
* resume: `resume.restore_or_init` on the copy, and
* codec: `codec.load_params` on the copy (the newest step).
Correct outcomes: a one-line refusal (CheckpointCorrupt, CheckpointMismatch,
CheckpointError, WorkdirLocked: no newline in the message), a resume whose whole restored
state equals an intact step's (the newest one the damage left intact: resuming from an
older step when the newest is intact counts as a failure), a codec load whose params equal
the newest step's, a lock taken over when stale and refused when live. Anything else is a
failure: any other exception, a multi-line message, other numbers. Failures keep their
seed and description in the JSON (`--replay` reruns them). `--cli` adds a few checks
through the command line (`hvq compress` on a damaged step; two `hvq train` at once).
"""
import argparse
import collections
import contextlib
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

# what is damaged: kind -> glob below a step folder
KINDS = collections.OrderedDict(
    array_data=["state/d/*", "state/ocdbt.process_*/d/*"],
    ocdbt_manifest=["state/manifest.ocdbt", "state/ocdbt.process_*/manifest.ocdbt"],
    state_metadata=["state/_METADATA", "state/_sharding", "state/array_metadatas/*"],
    step_metadata=["_CHECKPOINT_METADATA"],
    commit_marker=["commit_success.txt", "*/commit_success.txt"],
    data_iterator=["data/process_*"],
    config=["config/metadata"],
    checksums=["integrity/metadata"],
)
FOLDERS = ["state", "data", "config", "integrity", "state/ocdbt.process_0", "state/d",
           "state/ocdbt.process_0/d", "."]
# how often each fault is drawn
FAULTS = dict(bit_flip=25, byte_run=15, truncate=20, zero=5, delete_file=15, delete_folder=8,
              leftover_tmp=4, lock=8)
REFUSALS = ("CheckpointCorrupt", "CheckpointMismatch", "CheckpointError", "WorkdirLocked")


def run_config(num_steps: int = 2):
  """configs/micro.py's train_config (the tests' training run): saves at steps 0 and 2."""
  from hvq_jax.configs import micro
  return micro.train_config(num_steps)


def host(tree):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
      for k in a)


class Harness:
  """The run's checkpoints and their references; `case(seed)` runs one case. `config`,
  `trainer`, `data_iter`: another run's (the tests pass a synthetic state's)."""

  _DEFAULT = object()

  def __init__(self, run_dir: str, work: str, config=None, trainer=None, data_iter=_DEFAULT):
    from hvq_jax import checkpoint as ckpt_lib
    from hvq_jax.training import data as data_lib
    from hvq_jax.training import train
    self.config = run_config() if config is None else config
    self.work = work
    self.run = run_dir
    if not glob.glob(os.path.join(run_dir, "checkpoints", "2")):
      t = time.time()
      train.train_and_evaluate(self.config, run_dir, progress=False)
      print(f"made the run in {time.time() - t:.0f} s: {run_dir}")
    self.src = os.path.join(run_dir, "checkpoints")
    self.trainer = train.Trainer(self.config) if trainer is None else trainer
    self.data_iter = (iter(data_lib.train_dataset(self.config, 0, 1))
                      if data_iter is Harness._DEFAULT else data_iter)
    ck = ckpt_lib.Checkpointer(self.src, async_save=False, read_only=True)
    self.steps = sorted(ck.all_steps())
    # the references: every intact step's whole state and the codec's params
    self.state = {s: host(ck.restore(s, self.trainer.abstract_state)) for s in self.steps}
    ck.close()
    key = "ema_params" if self.config.train.ema_decay > 0 else "params"
    self.params = {s: {k[len(f"['{key}']"):]: v for k, v in self.state[s].items()
                       if k.startswith(f"['{key}']")} for s in self.steps}

  # ---- faults --------------------------------------------------------------------------
  def files(self, step_dir: str, kind: str):
    out = []
    for pattern in KINDS[kind]:
      out += [p for p in glob.glob(os.path.join(step_dir, pattern)) if os.path.isfile(p)]
    return sorted(set(out))

  def damage(self, rng, ck_dir: str, wd: str) -> dict:
    """Damage the copy at `ck_dir` (workdir `wd`); returns the case's description."""
    fault = rng.choice(list(FAULTS), p=np.array(list(FAULTS.values())) / sum(FAULTS.values()))
    newest = max(self.steps)
    r = rng.random()
    steps = [newest] if r < 0.75 else [min(self.steps)] if r < 0.92 else list(self.steps)
    desc = dict(fault=str(fault), steps=steps)
    if fault == "leftover_tmp":
      # an unfinished save: a step folder copied under Orbax's temporary name, half of it
      name = f"{newest + 2}.orbax-checkpoint-tmp-{int(rng.integers(1e9))}"
      shutil.copytree(os.path.join(ck_dir, str(newest)), os.path.join(ck_dir, name))
      for p in sorted(glob.glob(os.path.join(ck_dir, name, "**"), recursive=True))[::2]:
        if os.path.isfile(p):
          os.unlink(p)
      desc.update(kind="tmp_folder", file=name, steps=[])
      return desc
    if fault == "lock":
      holder = str(rng.choice(["live_here", "dead_here", "live_elsewhere", "expired_elsewhere"]))
      now = time.time()
      h = dict(host=socket.gethostname(), pid=os.getppid(), started=now - 60,
               lease_until=now + 300, token="other")
      if holder == "dead_here":
        h["pid"] = 2 ** 22 + int(rng.integers(1000))   # above pid_max's usual range
      elif holder != "live_here":
        h["host"] = "another-host"
        h["lease_until"] = now + (300 if holder == "live_elsewhere" else -30)
      os.makedirs(wd, exist_ok=True)
      with open(os.path.join(wd, "train.lock"), "w") as f:
        json.dump(h, f)
      desc.update(kind="lock", holder=holder, steps=[])
      return desc
    parts = []
    for step in steps:
      step_dir = os.path.join(ck_dir, str(step))
      desc = dict(fault=str(fault), steps=steps)
      parts.append(desc)
      if fault == "delete_folder":
        folder = str(rng.choice(FOLDERS))
        target = os.path.normpath(os.path.join(step_dir, folder))
        if os.path.isdir(target):
          shutil.rmtree(target)
        desc.update(kind="folder", file=f"{step}/{folder}")
        continue
      kind = str(rng.choice(list(KINDS)))
      files = self.files(step_dir, kind)
      if not files:
        desc.update(kind=kind, file=None)
        continue
      path = files[int(rng.integers(len(files)))]
      rel = os.path.relpath(path, ck_dir)
      data = bytearray(open(path, "rb").read())
      n = len(data)
      if fault == "bit_flip" and n:
        bits = int(rng.integers(1, 9))
        where = rng.integers(0, n * 8, size=bits)
        for b in where:
          data[b // 8] ^= 1 << (b % 8)
        desc.update(bits=[int(b) for b in where])
      elif fault == "byte_run" and n:
        at = int(rng.integers(0, max(n - 64, 1)))
        data[at:at + 64] = bytes(x ^ 0xFF for x in data[at:at + 64])
        desc.update(at=at)
      elif fault == "truncate":
        keep = int(rng.choice([0, 100, int(rng.integers(0, max(n, 1)))]))
        data = data[:min(keep, n - 1 if n else 0)]
        desc.update(keep=len(data))
      elif fault == "zero" and n:
        at, ln = int(rng.integers(0, n)), int(rng.integers(1, 4097))
        data[at:at + ln] = bytes(len(data[at:at + ln]))
        desc.update(at=at, length=ln)
      if fault == "delete_file":
        os.unlink(path)
      else:
        with open(path, "wb") as f:
          f.write(bytes(data))
      desc.update(kind=kind, file=rel, size=n)
    # the newest step's damage names the case; every step's is kept
    out = dict(parts[0], damage=[{k: v for k, v in p.items() if k not in ("fault", "steps")}
                                 for p in parts])
    return out

  # ---- outcomes ------------------------------------------------------------------------
  def classify_error(self, e: BaseException) -> str:
    name = type(e).__name__
    if name in REFUSALS and "\n" not in str(e) and str(e):
      return "refused"
    return "other_exception"

  def resume(self, wd: str, ck_dir: str, desc: dict):
    from hvq_jax import checkpoint as ckpt_lib
    from hvq_jax.training import resume, workdir_lock
    lock = None
    try:
      lock = workdir_lock.WorkdirLock(wd).acquire()
      ck = ckpt_lib.Checkpointer(ck_dir, async_save=False)
      try:
        state, start = resume.restore_or_init(ck, self.trainer, self.config, self.data_iter,
                                              False, wd)
      finally:
        ck.close()
    except Exception as e:   # noqa: BLE001
      kind = self.classify_error(e)
      if desc.get("kind") == "lock" and desc["holder"] in ("dead_here", "expired_elsewhere"):
        kind = "other_exception"   # a stale lock must be taken over
      return kind, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
      if lock is not None:
        lock.release()
    if desc.get("kind") == "lock" and desc["holder"] in ("live_here", "live_elsewhere"):
      return "lock_ignored", f"resumed from {start} although a live writer holds the lock"
    if start not in self.state or not same(host(state), self.state[start]):
      return "wrong_state", f"resumed from step {start} with other numbers"
    intact = [s for s in self.steps if s not in desc.get("steps", [])]
    if intact and start < max(intact):
      return "skipped_intact", f"resumed from {start}, step {max(intact)} was intact"
    return "resumed_intact", f"resumed from step {start}"

  def codec(self, ck_dir: str):
    from hvq_jax import codec
    try:
      _, params = codec.load_params(ck_dir)
    except Exception as e:   # noqa: BLE001
      return self.classify_error(e), f"{type(e).__name__}: {str(e)[:300]}"
    present = [int(n) for n in os.listdir(ck_dir) if n.isdigit()]
    step = max(present) if present else None
    if step not in self.params or not same(host(params), self.params[step]):
      return "wrong_params", f"loaded other params than step {step}'s"
    return "loaded_intact", f"loaded step {step}"

  def case(self, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    wd = os.path.join(self.work, f"case{seed}")
    ck_dir = os.path.join(wd, "checkpoints")
    shutil.copytree(self.src, ck_dir)
    desc = self.damage(rng, ck_dir, wd)
    out = dict(seed=seed, **desc)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
      warnings.simplefilter("always")
      try:
        out["resume"], out["resume_why"] = self.resume(wd, ck_dir, desc)
      except BaseException as e:   # noqa: BLE001
        out["resume"], out["resume_why"] = "crash", traceback.format_exc(limit=3)
        if isinstance(e, KeyboardInterrupt):
          raise
      # the codec reads the copy as the resume left it (damaged steps moved aside): load
      # it from a fresh copy so it meets the damage itself
      shutil.rmtree(wd)
      shutil.copytree(self.src, ck_dir)
      self.damage(np.random.default_rng(seed), ck_dir, wd)
      try:
        out["codec"], out["codec_why"] = self.codec(ck_dir)
      except BaseException as e:   # noqa: BLE001
        out["codec"], out["codec_why"] = "crash", traceback.format_exc(limit=3)
        if isinstance(e, KeyboardInterrupt):
          raise
    out["warnings"] = [str(w.message).split("\n")[0][:200] for w in caught][:4]
    shutil.rmtree(wd, ignore_errors=True)
    return out


GOOD = {"resume": ("refused", "resumed_intact"), "codec": ("refused", "loaded_intact")}


def failed(r: dict) -> bool:
  return any(r[k] not in ok for k, ok in GOOD.items())


def cli_checks(h: Harness, work: str) -> list:
  """A few checks through the command line: one-line refusals, two writers at once."""
  out = []
  # hvq compress on a damaged newest step (a params array): one line, exit 1
  wd = os.path.join(work, "cli_compress")
  shutil.copytree(h.src, os.path.join(wd, "checkpoints"))
  newest = max(h.steps)
  data = sorted(glob.glob(os.path.join(wd, "checkpoints", str(newest), "state", "**", "d", "*"),
                          recursive=True), key=os.path.getsize)
  for p in data:
    b = bytearray(open(p, "rb").read())
    m = len(b) // 2
    b[m:m + 64] = bytes(x ^ 0xFF for x in b[m:m + 64])
    open(p, "wb").write(bytes(b))
  photo = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "hvq_jax", "photos",
                                        "*.jpg")))[0]
  r = subprocess.run([sys.executable, "-m", "hvq_jax.cli", "compress", photo, "-o",
                      os.path.join(work, "x.hvq"), "--checkpoint", wd], capture_output=True,
                     text=True)
  lines = [l for l in r.stderr.splitlines() if l.startswith("hvq compress:")]
  ok = r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1 and \
      f"step {newest}" in lines[0] and "--step" in lines[0]
  out.append(dict(check="compress_damaged_step", ok=ok, rc=r.returncode,
                  message=(lines or [r.stderr[-300:]])[0]))
  # the same with --step of the intact older step: it codes
  r2 = subprocess.run([sys.executable, "-m", "hvq_jax.cli", "compress", photo, "-o",
                       os.path.join(work, "y.hvq"), "--checkpoint", wd, "--step",
                       str(min(h.steps))], capture_output=True, text=True)
  out.append(dict(check="compress_other_step", ok=r2.returncode == 0, rc=r2.returncode,
                  message=r2.stderr.strip().splitlines()[-1] if r2.stderr.strip() else ""))
  # two `hvq train` on one new workdir, 2 s apart: one trains, the other refuses in a line
  wd2 = os.path.join(work, "cli_two_writers")
  args = [sys.executable, "-m", "hvq_jax.cli", "train", "--workdir", wd2, "--progress=false",
          "--config.train.num_steps=0", "--config.eval.enabled=false"]
  p1 = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(2)
  p2 = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  o2 = p2.communicate()
  o1 = p1.communicate()
  refusal = [l for l in o2[1].splitlines() if l.startswith("hvq train:")]
  tmp_left = glob.glob(os.path.join(wd2, "checkpoints", "*orbax-checkpoint-tmp*"))
  ok = (p1.returncode == 0 and p2.returncode == 1 and len(refusal) == 1
        and "in use by another training run" in refusal[0] and "Traceback" not in o2[1]
        and not tmp_left and os.path.isdir(os.path.join(wd2, "checkpoints", "0")))
  out.append(dict(check="two_writers", ok=ok, rc=[p1.returncode, p2.returncode],
                  message=(refusal or [o2[1][-300:]])[0]))
  return out


def summarise(results: list, elapsed: float, cli: list) -> dict:
  by = lambda key: dict(collections.Counter(r[key] for r in results))
  per_kind = collections.defaultdict(collections.Counter)
  for r in results:
    per_kind[r.get("kind") or "none"][f"resume:{r['resume']}"] += 1
    per_kind[r.get("kind") or "none"][f"codec:{r['codec']}"] += 1
  fails = [r for r in results if failed(r)]
  return dict(cases=len(results), seconds=elapsed, cases_per_s=len(results) / max(elapsed, 1e-9),
              failures=len(fails), per_fault=by("fault"), per_kind=by("kind"),
              resume=by("resume"), codec=by("codec"),
              per_kind_outcomes={k: dict(v) for k, v in sorted(per_kind.items())},
              cli=cli, failed_cases=fails[:200],
              examples={o: next(r[f"{w}_why"] for r in results if r[w] == o)
                        for w in ("resume", "codec") for o in set(r[w] for r in results)})


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=1000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--run", default=None, help="workdir of the tiny run (made when absent)")
  ap.add_argument("--out", default="benchmarks/results/checkpoint_faults.json")
  ap.add_argument("--replay", default=None, help="a results JSON: rerun its failed cases")
  ap.add_argument("--cli", action="store_true", help="also the command-line checks")
  a = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  work = tempfile.mkdtemp(prefix="hvq_faults_")
  run_dir = a.run or os.path.join(work, "run")
  try:
    h = Harness(run_dir, work)
    seeds = ([r["seed"] for r in json.load(open(a.replay))["failed_cases"]] if a.replay
             else [a.seed * 1_000_000 + i for i in range(a.n)])
    t = time.time()
    results = []
    for i, seed in enumerate(seeds):
      results.append(h.case(seed))
      if failed(results[-1]):
        r = results[-1]
        print(f"FAILURE seed {seed}: {r['fault']} {r.get('kind')} {r.get('file')}: "
              f"resume {r['resume']} ({r['resume_why'][:200]}), codec {r['codec']} "
              f"({r['codec_why'][:200]})", flush=True)
      if (i + 1) % 50 == 0:
        print(f"{i + 1}/{len(seeds)} cases, {time.time() - t:.0f} s, "
              f"{sum(map(failed, results))} failures", flush=True)
    elapsed = time.time() - t
    cli = cli_checks(h, work) if a.cli else []
    summary = summarise(results, elapsed, cli)
    summary.update(seed=a.seed, run_steps=h.steps)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(json.dumps({k: summary[k] for k in ("cases", "seconds", "failures", "per_fault",
                                            "per_kind", "resume", "codec", "cli")}, indent=1))
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {a.out}")
  return 1 if summary["failures"] or not all(c["ok"] for c in cli) else 0


if __name__ == "__main__":
  sys.exit(main())
