"""Launch paths users have: two DeepSpeed "nodes" on this machine (hostfile, --no_ssh, one launcher
per node) and `accelerate launch --use_deepspeed`; both must train in step with one node of 2 ranks."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from tests.dist.train_entry import free_port, launcher_env, write_tiny_config

pytestmark = pytest.mark.slow
PRETRAIN = os.path.join(ROOT, "launch", "pretrain.py")


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def common(tmp_path_factory, synth_train):
    cfg = write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))
    return ["--config", cfg, f"data.train_shards={synth_train}", "data.workers=1", "train.steps=6",
            "train.micro_batch_size=8", "train.resume=none"]


@pytest.fixture(scope="module")
def one_node(common, tmp_path_factory):
    out, port = tmp_path_factory.mktemp("one_node"), free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           PRETRAIN, *common, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM each) are released when the ranks finish
    import glob

    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 7))
    return losses


def test_two_nodes_with_hostfile_train_in_step(common, one_node, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, out = free_port(), tmp_path / "two_nodes"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               PRETRAIN, *common, f"output_dir={out}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert _losses(out) == one_node  # same world (2 ranks), same data split: identical losses


def test_accelerate_launch_with_deepspeed(common, one_node, tmp_path):
    out = tmp_path / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--zero_stage", "0",
           "--mixed_precision", "no", PRETRAIN, *common, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert _losses(out) == one_node


def test_sigterm_to_the_launchers_process_group_saves_and_resumes(common, tmp_path):
    """SLURM's --signal, `docker stop` and Ctrl-C signal the whole process group: `vlp train --nproc 2`,
    DeepSpeed's launcher, both ranks and their DataLoader workers. The workers ignore it, each rank saves
    at the next step boundary, and the command exits 128 + SIGTERM; rerunning resumes. (Before: the
    workers died first, the ranks failed on "DataLoader worker killed by signal", no checkpoint.)"""
    import signal
    import time

    out = tmp_path / "run"
    args = [a for a in common if a not in ("data.workers=1", "train.steps=6")]
    cmd = [sys.executable, "-m", "vlp.cli", "train", "--nproc", "2", *args, "data.workers=2",
           "train.steps=400", "train.save_every=0", "train.log_every=1", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "killed by signal" not in log
    latest = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / latest / "vlp_state.json").read_text())
    assert 3 <= state["step"] < 400 and state["world_size"] == 2
    # rerunning the same command (fewer steps to go) resumes from it
    again = {"train.steps=400": f"train.steps={state['step'] + 2}", "train.resume=none": "train.resume=auto"}
    rerun = subprocess.run([again.get(c, c) for c in cmd],
                           cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest} at step {state['step']}" in rerun.stderr + rerun.stdout


EXIT_WITH_BUSY_WORKER = r"""
import time, torch
from torch.utils.data import IterableDataset
from vlp.eval.data import eval_loader

class Slow(IterableDataset):
    def __iter__(self):
        yield {"index": 0, "key": "a", "image": torch.zeros(3, 4, 4)}
        time.sleep(600)  # busy when the process exits, like a worker started for the next epoch

it = iter(eval_loader(Slow(), batch_size=1, workers=1))
next(it)
print("exiting", flush=True)
"""


def test_a_busy_dataloader_worker_does_not_keep_the_process_alive_at_exit():
    """Workers ignore SIGTERM (stop signals are the rank's); at exit multiprocessing ends leftover workers
    with SIGTERM and waits for them, which hung `vlp demo` after training. vlp kills them instead."""
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_BUSY_WORKER], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]


def test_a_child_of_an_in_process_run_takes_its_own_port(common, tmp_path):
    """A process that trained in-process keeps the env:// variables of its world of one (the process group
    lives on); a `vlp train` it starts inherits them. Before: the child reused the parent's MASTER_PORT and
    failed with EADDRINUSE whenever that port was taken (the parent's store, or a sibling run)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = dict(launcher_env(), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, VLP_SINGLE_PROCESS_PORT=port)  # what vlp.dist leaves after an in-process run
        args = [a for a in common if a != "train.steps=6"]
        proc = subprocess.run([sys.executable, "-m", "vlp.cli", "train", *args, "train.steps=1",
                               f"output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
