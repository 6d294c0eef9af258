"""When and how `hvq train` calls `jax.distributed.initialize()`.

`plan()` is a pure function of the environment and the command-line flags, so every
launcher's start-up can be tested without its cluster:

* Cloud TPU VM slice (`launch/tpu_vm.sh` passes `--distributed=on`), SLURM and Open MPI:
  `initialize()` needs no address; JAX finds the coordinator, the process count and id
  (TPU: the metadata server; SLURM: SLURM_* variables; Open MPI: OMPI_* variables).
* With `--distributed=auto` a multi-host launch is recognised by: an explicit
  coordinator (flag or JAX_COORDINATOR_ADDRESS); a SLURM step with several tasks;
  Open MPI with several ranks; GKE TPU (TPU_WORKER_HOSTNAMES); or a TPU VM whose
  metadata lists several workers.
* SLURM GPUs: JAX gives each process the one GPU numbered SLURM_LOCALID, which is right
  for one task per GPU. With fewer tasks than GPUs on a node (e.g. one task per node)
  each task gets its block of the node's GPUs here, so an 8-GPU node gives 8 devices.
"""
import glob
import os
import re
from typing import Dict, List, Mapping, Optional


class DistributedError(ValueError):
  """A process layout that cannot work; the message names the variables and the fix."""


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
  v = env.get(key, "")
  try:
    return int(v)
  except ValueError:
    return None


def expand_tasks_per_node(spec: str) -> List[int]:
  """SLURM's compressed list '8(x2),4' -> [8, 8, 4]."""
  out = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise DistributedError(f"cannot read a SLURM tasks-per-node list {spec!r}")
    out += [int(m.group(1))] * int(m.group(2) or 1)
  return out


def slurm_tasks_on_node(env: Mapping[str, str]) -> Optional[int]:
  for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(key):
      counts = expand_tasks_per_node(env[key])
      node = _int(env, "SLURM_NODEID") or 0
      return counts[node] if node < len(counts) else counts[-1]
  return _int(env, "SLURM_NTASKS_PER_NODE")


def visible_gpus(env: Mapping[str, str]) -> Optional[int]:
  """How many GPUs this process can see, from the environment (None: no GPU info)."""
  cvd = env.get("CUDA_VISIBLE_DEVICES")
  if cvd is not None and cvd.strip() and cvd.strip() != "NoDevFiles":
    return len([d for d in cvd.split(",") if d.strip()])
  return _int(env, "SLURM_GPUS_ON_NODE")


def slurm_local_device_ids(env: Mapping[str, str]) -> Optional[List[int]]:
  """The GPUs (ordinals among the visible ones) this SLURM task should drive; None when
  JAX's default (the GPU numbered SLURM_LOCALID) is right or no GPU is visible."""
  gpus, tasks = visible_gpus(env), slurm_tasks_on_node(env)
  local = _int(env, "SLURM_LOCALID") or 0
  if not gpus or not tasks or tasks == gpus:
    return None
  if gpus == 1:          # per-task binding (--gpus-per-task=1): its one GPU is ordinal 0
    return [0]
  if gpus % tasks:
    raise DistributedError(
        f"SLURM starts {tasks} tasks on this node, which has {gpus} visible GPUs: use one task "
        f"per GPU (--ntasks-per-node={gpus}) or a count that divides {gpus}")
  k = gpus // tasks
  return list(range(local * k, (local + 1) * k))


def tpu_chips_present() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_vm_workers(env: Mapping[str, str], timeout: float = 5.0) -> Optional[int]:
  """Workers of this Cloud TPU VM slice from the GCE metadata server (the server JAX asks;
  GCE_METADATA_IP overrides its address as in JAX), or None when there is none."""
  import urllib.error
  import urllib.request
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  req = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      text = r.read().decode().strip()
  except (urllib.error.URLError, OSError, ValueError):
    return None
  return len([w for w in text.split(",") if w.strip()]) or None


def multihost_reason(env: Mapping[str, str], probe_tpu: bool = True) -> Optional[str]:
  """Why this looks like one of several processes, or None."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if "SLURM_JOB_ID" in env and (_int(env, "SLURM_STEP_NUM_TASKS") or 1) > 1:
    return f"SLURM step with {env['SLURM_STEP_NUM_TASKS']} tasks"
  if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} ranks"
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if "," in env.get(key, ""):
      return f"{key} lists several hosts (GKE TPU)"
  if probe_tpu and (tpu_chips_present() or env.get("GCE_METADATA_IP")):
    n = tpu_vm_workers(env)
    if n and n > 1:
      return f"TPU VM slice with {n} workers (metadata server)"
  return None


def plan(mode: str, env: Optional[Mapping[str, str]] = None, coordinator: Optional[str] = None,
         num_processes: Optional[int] = None, process_id: Optional[int] = None,
         local_device_ids: Optional[str] = None, probe_tpu: bool = True) -> Optional[Dict]:
  """None (a single process: do not initialize) or dict(kwargs=..., reason=...) for
  `jax.distributed.initialize(**kwargs)`. Unset kwargs are left to JAX's cluster
  detection (TPU metadata, SLURM, Open MPI)."""
  env = os.environ if env is None else env
  if mode not in ("auto", "on", "off"):
    raise DistributedError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off":
    return None
  reason = "--distributed=on" if mode == "on" else (
      "--coordinator is set" if coordinator else multihost_reason(env, probe_tpu))
  if reason is None:
    return None
  kwargs = {}
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num_processes is not None:
    kwargs["num_processes"] = int(num_processes)
  if process_id is not None:
    kwargs["process_id"] = int(process_id)
  if local_device_ids:
    try:
      kwargs["local_device_ids"] = [int(v) for v in str(local_device_ids).split(",")]
    except ValueError:
      raise DistributedError(f"--local_device_ids must be comma-separated integers, "
                             f"got {local_device_ids!r}") from None
  elif "SLURM_JOB_ID" in env and "SLURM_LOCALID" in env and not env.get("JAX_LOCAL_DEVICE_IDS"):
    ids = slurm_local_device_ids(env)
    if ids is not None:
      kwargs["local_device_ids"] = ids
  return dict(kwargs=kwargs, reason=reason)


def initialize(p: Optional[Dict]) -> None:
  if p is None:
    return
  import jax
  jax.distributed.initialize(**p["kwargs"])
