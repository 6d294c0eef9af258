"""Launchers and process layouts without a TPU or a cluster.

* `distributed.plan` under SLURM-, Open MPI-, GKE- and TPU-VM-like environments (the TPU
  metadata server is emulated on localhost), and two real processes started under
  SLURM-like variables: which initialize() path runs and which GPUs each process gets.
* `launch/tpu_vm.sh` in dry-run mode: the gcloud commands, the Python step, recreation
  after preemption; its log-following command run for real.
* `launch/slurm_gpu.sbatch` with stand-ins for srun/scontrol: arguments arrive intact,
  a preemption exit requeues, a scancel does not. A real one-node SLURM run (slurm-wlm)
  is the slow test at the end.
"""
import http.server
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hvq_jax.training import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(ROOT, "launch", "tpu_vm.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---- distributed.plan --------------------------------------------------------------------
def slurm_env(tasks_per_node, nodes=1, node=0, local=0, gpus=None, step=True):
  env = dict(SLURM_JOB_ID="4242", SLURM_NTASKS=str(tasks_per_node * nodes),
             SLURM_PROCID=str(node * tasks_per_node + local), SLURM_LOCALID=str(local),
             SLURM_NODEID=str(node), SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
             SLURM_STEP_NODELIST="gpu[01-02]")
  if step:   # inside `srun` (not the batch shell)
    env.update(SLURM_STEP_NUM_TASKS=str(tasks_per_node * nodes),
               SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})")
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = gpus
  return env


EIGHT = "0,1,2,3,4,5,6,7"


def test_plan_single_process_does_not_initialize():
  assert distributed.plan("auto", {}, probe_tpu=False) is None
  assert distributed.plan("off", slurm_env(8, 2, gpus=EIGHT)) is None
  # The batch shell of a multi-task job (no srun step) is one process.
  assert distributed.plan("auto", slurm_env(8, 2, gpus=EIGHT, step=False), probe_tpu=False) is None


def test_plan_slurm_gpu_layouts():
  # One task per GPU: JAX's default (the GPU numbered SLURM_LOCALID) is right.
  p = distributed.plan("auto", slurm_env(8, 2, node=1, local=3, gpus=EIGHT))
  assert p["kwargs"] == {} and "SLURM step with 16 tasks" in p["reason"]
  # One task per 8-GPU node: all 8 (JAX alone would give it GPU 0 only).
  p = distributed.plan("auto", slurm_env(1, 2, node=1, gpus=EIGHT))
  assert p["kwargs"] == {"local_device_ids": list(range(8))}
  # Two tasks per node: a block of four each.
  assert distributed.plan("on", slurm_env(2, 2, local=1, gpus=EIGHT))["kwargs"] == {
      "local_device_ids": [4, 5, 6, 7]}
  # --gpus-per-task=1 binding: the task sees one GPU, ordinal 0 (not SLURM_LOCALID).
  assert distributed.plan("on", slurm_env(8, 1, local=5, gpus="5"))["kwargs"] == {
      "local_device_ids": [0]}
  with pytest.raises(distributed.DistributedError, match="3 tasks on this node.*8 visible GPUs"):
    distributed.plan("on", slurm_env(3, 1, gpus=EIGHT))
  # Explicit flag wins; no GPUs (CPU run): JAX's default.
  assert distributed.plan("on", slurm_env(1, 2, gpus=EIGHT), local_device_ids="0,1")["kwargs"] == {
      "local_device_ids": [0, 1]}
  assert distributed.plan("auto", slurm_env(2, 1))["kwargs"] == {}
  assert distributed.expand_tasks_per_node("8(x2),4") == [8, 8, 4]


def test_plan_other_launchers():
  assert "Open MPI with 4" in distributed.plan("auto", {"OMPI_COMM_WORLD_SIZE": "4"},
                                               probe_tpu=False)["reason"]
  assert "GKE" in distributed.plan("auto", {"TPU_WORKER_HOSTNAMES": "a,b"},
                                   probe_tpu=False)["reason"]
  p = distributed.plan("auto", {}, coordinator="h:1234", num_processes=2, process_id=1)
  assert p["kwargs"] == dict(coordinator_address="h:1234", num_processes=2, process_id=1)
  # TPU VM (launch/tpu_vm.sh passes --distributed=on): no arguments, JAX asks the metadata.
  assert distributed.plan("on", {}) == dict(kwargs={}, reason="--distributed=on")


class _Metadata(http.server.BaseHTTPRequestHandler):
  workers = "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"

  def do_GET(self):
    ok = (self.path.endswith("/instance/attributes/worker-network-endpoints")
          and self.headers.get("Metadata-Flavor") == "Google")
    body = self.workers.encode() if ok else b"not found"
    self.send_response(200 if ok else 404)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *a):
    pass


def test_plan_finds_a_tpu_vm_slice_from_the_metadata_server():
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  env = {"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"}
  try:
    assert distributed.tpu_vm_workers(env) == 4
    assert distributed.plan("auto", env) == dict(
        kwargs={}, reason="TPU VM slice with 4 workers (metadata server)")
    _Metadata.workers = "10.0.0.2"     # a single-host slice (v5e-8): one process
    assert distributed.plan("auto", env) is None
  finally:
    _Metadata.workers = "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"
    server.shutdown()
  assert distributed.tpu_vm_workers({"GCE_METADATA_IP": f"127.0.0.1:{_free_port()}"}) is None


_PROBE = textwrap.dedent("""
    import json, os, jax
    from hvq_jax.training import distributed
    p = distributed.plan("auto")
    distributed.initialize(p)
    print(json.dumps(dict(kwargs=p["kwargs"], processes=jax.process_count(),
                          index=jax.process_index(), local_devices=jax.local_device_count(),
                          devices=jax.device_count(),
                          cuda_visible=str(jax.config.values["jax_cuda_visible_devices"]))))
    jax.distributed.shutdown()
""")


@pytest.mark.parametrize("layout", ["task_per_gpu", "task_per_node"])
def test_two_slurm_tasks_start_jax_distributed(layout):
  """Two processes on localhost under SLURM-like variables: jax.distributed.initialize()
  runs through JAX's SLURM detection (no address given), and each process is told the
  GPUs of its layout (CUDA is absent here: the CPU devices come from XLA_FLAGS)."""
  port = _free_port()
  procs = []
  for i in range(2):
    if layout == "task_per_gpu":     # 2 tasks on one node with 2 GPUs
      env = slurm_env(2, 1, local=i, gpus="0,1")
    else:                            # 1 task on each of 2 nodes with 8 GPUs
      env = slurm_env(1, 2, node=i, gpus=EIGHT)
    env.update(SLURM_STEP_NODELIST="localhost", JAX_COORDINATOR_PORT=str(port))
    env = dict(os.environ, **env, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, "-c", _PROBE], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o["index"] for o in outs] == [0, 1]
  assert all(o["processes"] == 2 and o["devices"] == 4 and o["local_devices"] == 2 for o in outs)
  if layout == "task_per_gpu":
    assert [o["kwargs"] for o in outs] == [{}, {}]
    assert [o["cuda_visible"] for o in outs] == ["0", "1"]     # JAX: GPU = SLURM_LOCALID
  else:
    assert [o["cuda_visible"] for o in outs] == [EIGHT, EIGHT]  # all of the node's GPUs


# ---- launch/tpu_vm.sh --------------------------------------------------------------------
def _tpu_dry_run(tmp_path, answers, args=(), **env):
  ans = tmp_path / "answers"
  ans.write_text("".join(a + "\n" for a in answers))
  full = dict(os.environ, DRY_RUN="1", DRY_RUN_ANSWERS=str(ans), POLL="0", PROJECT="proj",
              ZONE="us-central2-b", TPU_NAME="hvq", ACCELERATOR_TYPE="v4-32",
              WORKDIR="gs://bkt/run")
  full.update(env)
  r = subprocess.run(["bash", TPU_SH, *args], env=full, capture_output=True, text=True,
                     timeout=60)
  cmds = [shlex.split(l[2:]) for l in r.stderr.splitlines() if l.startswith("+ gcloud")]
  return r, cmds, ans.read_text()


def _verbs(cmds):
  return [" ".join(c[4:7]) for c in cmds]   # gcloud --project=P compute tpus VERB...


def test_tpu_vm_spot_preemption_recreates_and_resumes(tmp_path):
  r, cmds, left = _tpu_dry_run(
      tmp_path, ["rc=255", "PREEMPTED", "rc=0"], SPOT="1",
      args=["--config.mesh.shape=(-1,4)", "--config.data.tfds_name=my data"])
  assert r.returncode == 0, r.stderr
  assert left == ""                 # every state query was asked
  v = _verbs(cmds)
  assert v == ["tpu-vm create hvq", "tpu-vm scp /tmp/hvq_jax_src.tgz", "tpu-vm ssh hvq",
               "tpu-vm scp /tmp/hvq_run_hvq.sh", "tpu-vm ssh hvq", "tpu-vm ssh hvq",
               "tpu-vm describe hvq",
               "tpu-vm delete hvq", "tpu-vm create hvq", "tpu-vm scp /tmp/hvq_jax_src.tgz",
               "tpu-vm ssh hvq", "tpu-vm scp /tmp/hvq_run_hvq.sh", "tpu-vm ssh hvq",
               "tpu-vm ssh hvq", "tpu-vm delete hvq"]
  create = cmds[0]
  assert "--spot" in create and "--version=tpu-ubuntu2204-base" in create
  install = cmds[2][-1]
  assert "uv venv -q --allow-existing --python 3.12 ~/hvq_venv" in install
  assert "assert sys.version_info >= (3, 11)" in install
  assert "-e ~/hvq_jax'[tfds,gcs,lpips]'" in install and "'jax[tpu]'" in install
  # The training command reaches every host with its arguments as given.
  script = open("/tmp/hvq_run_hvq.sh").read()
  line = [l for l in script.splitlines() if "hvq train" in l][0]
  argv = shlex.split(line.split(" > ")[0])
  assert argv[1:] == ["train", "--distributed=on", "--noprogress", "--config",
                      "configs/default.py", "--workdir", "gs://bkt/run",
                      "--config.mesh.shape=(-1,4)", "--config.data.tfds_name=my data"]
  assert "pgrep" not in r.stderr
  assert "slice preempted: deleting and recreating it" in r.stderr


def test_tpu_vm_queued_resource_waits_and_recreates_when_suspended(tmp_path):
  r, cmds, left = _tpu_dry_run(
      tmp_path, ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "rc=75", "SUSPENDED",
                 "FAILED", "ACTIVE", "rc=0"],
      QUEUED="1", SPOT="1", ACCELERATOR_TYPE="v5litepod-16")
  assert r.returncode == 0, r.stderr
  assert left == ""
  qr = [c for c in cmds if "queued-resources" in c]
  assert [c[5] for c in qr] == ["create", "describe", "describe", "describe", "describe",
                                "delete", "create", "describe", "delete", "create",
                                "describe", "delete"]
  assert "--runtime-version=v2-alpha-tpuv5-lite" in qr[0] and "--spot" in qr[0]
  assert "queued resource hvq-qr is FAILED" in r.stderr


def test_tpu_vm_runtime_versions_and_refusals(tmp_path):
  for acc, rt in [("v6e-16", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"),
                  ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base")]:
    r, cmds, _ = _tpu_dry_run(tmp_path, [], STEP="create", ACCELERATOR_TYPE=acc)
    assert r.returncode == 0 and f"--version={rt}" in cmds[0], (acc, r.stderr)
  r, _, _ = _tpu_dry_run(tmp_path, [], STEP="create", WORKDIR="/home/me/run")
  assert r.returncode == 2 and "use a gs:// URL" in r.stderr
  # A failed run stops and still deletes the slice (it would bill on).
  r, cmds, _ = _tpu_dry_run(tmp_path, ["rc=1"])
  assert r.returncode == 1 and "hvq train failed (exit code 1)" in r.stderr
  assert _verbs(cmds)[-1] == "tpu-vm delete hvq"


def test_tpu_vm_log_follower_ends_with_the_training_exit_code(tmp_path):
  """The command STEP=tail runs on worker 0, run here: it ends when training writes its
  exit code, and returns it. The old `while pgrep -f 'hvq train'` matched its own shell."""
  _, cmds, _ = _tpu_dry_run(tmp_path, ["rc=0"], STEP="tail")
  remote = [c for c in cmds if "--worker=0" in c][0][-1].split("=", 1)[1]
  home = tmp_path / "home"
  home.mkdir()
  env = dict(os.environ, HOME=str(home), HVQ_TAIL_POLL="0.1")
  (home / "hvq_train.log").write_text("step 1\n")
  p = subprocess.Popen(["bash", "-c", remote], env=env, stdout=subprocess.PIPE, text=True)
  time.sleep(1.0)
  assert p.poll() is None                      # training still running: keeps following
  with open(home / "hvq_train.log", "a") as f:
    f.write("preempted: saved step 2\n")
  (home / "hvq_train.rc").write_text("75\n")
  out, _ = p.communicate(timeout=30)
  assert p.returncode == 75 and "step 1" in out
  old = "while pgrep -f 'hvq train' >/dev/null; do sleep 0.1; done"
  with pytest.raises(subprocess.TimeoutExpired):
    subprocess.run(["bash", "-c", old], timeout=2)


# ---- launch/slurm_gpu.sbatch ------------------------------------------------------------
def _fake_bin(tmp_path, srun_body, srun_setup=""):
  b = tmp_path / "bin"
  b.mkdir(exist_ok=True)
  (b / "srun").write_text("#!/usr/bin/env bash\n" + srun_setup + "\n"
                          "printf '%s\\n' \"$@\" > \"$LOG/srun.args\"\n" + srun_body + "\n")
  (b / "scontrol").write_text("#!/usr/bin/env bash\necho \"$@\" >> \"$LOG/scontrol\"\n")
  for f in b.iterdir():
    f.chmod(0o755)
  return b


def _sbatch_env(tmp_path, b, **kw):
  return dict(os.environ, PATH=f"{b}:{os.environ['PATH']}", LOG=str(tmp_path),
              WORKDIR="/shared/run", SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(tmp_path), **kw)


def test_sbatch_passes_arguments_and_requeues_after_a_preemption_save(tmp_path):
  b = _fake_bin(tmp_path, "exit 75")
  r = subprocess.run(["bash", SBATCH, "--config.mesh.shape=(-1,8)", "--config.seed=3"],
                     env=_sbatch_env(tmp_path, b), capture_output=True, text=True, timeout=60)
  assert r.returncode == 75, r.stderr
  args = (tmp_path / "srun.args").read_text().splitlines()
  assert args == ["--kill-on-bad-exit=1", "hvq", "train", "--distributed=on", "--noprogress",
                  "--config", "configs/default.py", "--workdir", "/shared/run",
                  "--config.mesh.shape=(-1,8)", "--config.seed=3"]
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]
  # Finished, failed, or requeued too often: no requeue.
  for body, extra in [("exit 0", {}), ("exit 1", {}),
                      ("exit 75", {"SLURM_RESTART_COUNT": "50"})]:
    (tmp_path / "scontrol").unlink(missing_ok=True)
    b = _fake_bin(tmp_path, body)
    r = subprocess.run(["bash", SBATCH], env=_sbatch_env(tmp_path, b, **extra),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == int(body.split()[1]) and not (tmp_path / "scontrol").exists()


def test_sbatch_does_not_requeue_a_cancelled_job(tmp_path):
  # scancel signals the batch shell too; the tasks then save and exit 75.
  b = _fake_bin(tmp_path, "while :; do sleep 0.05; done", srun_setup="trap 'exit 75' TERM")
  p = subprocess.Popen(["bash", SBATCH], env=_sbatch_env(tmp_path, b),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / "srun.args").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 75, err
  assert not (tmp_path / "scontrol").exists()


# ---- a real SLURM (slurm-wlm, one node on localhost) -----------------------------------
def _slurm_up():
  try:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                          timeout=10).stdout.strip() in ("idle", "mix", "alloc")
  except (OSError, subprocess.TimeoutExpired):
    return False


def _job_state(job):
  r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
  for tok in r.stdout.split():
    if tok.startswith("JobState="):
      return tok.split("=", 1)[1]
  return "GONE"


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="needs a running SLURM cluster (slurmctld + slurmd)")
def test_sbatch_on_real_slurm_requeues_and_resumes(tmp_path):
  """launch/slurm_gpu.sbatch on a one-node SLURM with 2 tasks (CPU devices): both tasks
  train as one JAX job; `scancel --signal=TERM` (what --signal=TERM@120 sends the tasks
  before the time limit) makes them save at the preemption sync point and exit 75; the
  script requeues the job, which resumes from that checkpoint and finishes."""
  import hvq_jax.configs as configs
  wd = tmp_path / "wd"
  env = dict(os.environ, WORKDIR=str(wd), JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             CONFIG=os.path.join(os.path.dirname(configs.__file__), "tiny_cpu.py"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("HVQ_TEST_JIT_CACHE",
                                                       "/tmp/hvq_jax_test_jit_cache"))
  steps = 40
  micro = ["--config.model.ch=16", "--config.model.dec_ch=16", "--config.model.norm_groups=4",
           "--config.model.codebook_size=64", "--config.model.hyperprior.channels=16",
           "--config.model.hyperprior.latent_channels=4", "--config.image_size=64",
           "--config.train.batch_size=2", f"--config.train.num_steps={steps}",
           "--config.train.log_every=1", "--config.train.ckpt_every=1000",
           "--config.eval.enabled=False", "--config.mesh.shape=(-1,1)"]
  out = tmp_path / "slurm-%j.out"
  r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
                      "--gpus-per-node=0", "--cpus-per-task=1", "--time=30",
                      f"--output={out}", "--chdir", ROOT, SBATCH, *micro],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  job = r.stdout.strip().split(";")[0]
  log = tmp_path / f"slurm-{job}.out"
  metrics = wd / "metrics.jsonl"
  try:
    deadline = time.time() + 900
    while time.time() < deadline:   # wait until both tasks train
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      assert _job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()
      time.sleep(1)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    while time.time() < deadline and _job_state(job) not in ("COMPLETED", "FAILED", "GONE",
                                                           "CANCELLED", "TIMEOUT"):
      time.sleep(2)
    text = log.read_text()
    assert _job_state(job) in ("COMPLETED", "GONE"), text[-3000:]
  finally:
    subprocess.run(["scancel", job], capture_output=True)
  # both tasks start JAX's SLURM detection (no address given), before and after the requeue
  assert text.count("hvq train: jax.distributed.initialize(): --distributed=on") == 4
  assert "hvq train exited with code 75 (job" in text and "requeueing job" in text
  assert "resumed from step" in text
  assert "hvq train exited with code 0" in text and "restart 1)" in text
  saved = int(text.split("preempted: saved step ")[1].split(";")[0])
  from hvq_jax import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(str(wd / "checkpoints"))
  assert saved in ck.all_steps() and ck.latest_step() == steps
  ck.close()
  lines = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert lines == list(range(1, steps + 1))   # each step once, across the requeue
