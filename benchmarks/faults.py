"""Fault injection: a 2-rank run SIGKILLed at random points, resumed with `train.resume=auto` each time,
must end bit-identical to the uninterrupted run, having consumed every sample of each epoch exactly once.

One uninterrupted reference run, then the same run (same config, seed and data) in another directory:
`--kills` times a random rank process is SIGKILLed at a random optimizer step (drawn between the last
checkpoint and the end, uniformly), the launcher brings the job down, and the command is run again
(`train.resume=auto`). Once, a SIGTERM goes to the launcher's whole process group right as a checkpoint
is being written; the run must exit with 128 + 15 and leave a checkpoint the next launch resumes from.
After the last kill the run completes. Then:

- the final weights (the fp32 consolidated state dict of the last checkpoint) equal the reference's, bit
  for bit (CPU, fp32);
- every sample of every epoch was consumed exactly once: `train.log_keys` logs each rank's keys per step;
  after a resume the steps since the checkpoint run again, and for each step the record of the last
  launch that ran it is the one whose weights were kept;
- work lost per kill: the optimizer steps run after the last checkpoint (at most `save_every`), and their
  seconds at the run's mean step time.

    python benchmarks/faults.py [--kills 10] [--steps 60] [--save-every 5] [--seed 0] [--json]

Data: `vlp data synth` (640 samples; 2 ranks x 16 = 32 per step: 20 steps per epoch, 3 epochs in 60 steps),
configs/demo_clip.yaml with 2 loader workers per rank (so DataLoader workers are in every kill), ZeRO 0.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".bench", "faults")
SAMPLES = 640


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: str, data: str, a) -> List[str]:
    return [f"output_dir={out}", f"data.train_shards={data}", f"data.eval_shards={data}", f"train.steps={a.steps}",
            f"train.save_every={a.save_every}", "train.keep_last=2", "train.micro_batch_size=16",
            "train.warmup_steps=5", "train.log_every=1", "train.log_keys=true", "train.curves=false",
            "train.tensorboard=false", "data.workers=2", "data.shuffle_buffer=64", f"train.seed={a.seed}",
            "train.resume=auto"]


def _launch(out: str, data: str, a, log) -> Tuple[subprocess.Popen, int]:
    port = _port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           os.path.join(ROOT, "launch", "pretrain.py"), "--config", os.path.join(ROOT, "configs", "demo_clip.yaml"),
           *_overrides(out, data, a)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), port


def _cleanup(port: int) -> None:
    """A SIGKILLed rank cannot release DeepSpeed's CPU all-reduce buffer in /dev/shm: drop this job's."""
    for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.unlink(leftover)


def _key_lines(out: str) -> Dict[str, int]:
    """Lines in each rank's keys log now (what earlier launches logged)."""
    counts = {}
    for path in glob.glob(os.path.join(out, "keys", "rank*.jsonl")):
        with open(path) as f:
            counts[path] = sum(1 for _ in f)
    return counts


def _last_step(out: str, skip: Optional[Dict[str, int]] = None) -> int:
    """The highest step this launch logged (lines after `skip[path]`, those of earlier launches)."""
    best = 0
    for path in glob.glob(os.path.join(out, "keys", "rank*.jsonl")):
        with open(path) as f:
            for i, line in enumerate(f):
                if i < (skip or {}).get(path, 0):
                    continue
                try:
                    best = max(best, json.loads(line)["step"])
                except (ValueError, KeyError):
                    continue
    return best


def _ckpt_step(out: str) -> int:
    try:
        with open(os.path.join(out, "checkpoints", "latest")) as f:
            return int(f.read().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


def _rank_pids(launcher_pid: int) -> Dict[int, int]:
    """local rank -> pid of the rank processes in the launcher's session."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != launcher_pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace").split("\0")
        except (OSError, ProcessLookupError):
            continue
        for c in cmd:
            if c.startswith("--local_rank="):
                rank = int(c.split("=", 1)[1])
                # the rank itself, not its DataLoader workers (same command line, parent is the rank)
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{ppid}/cmdline", "rb") as f:
                    parent = f.read().decode(errors="replace")
                if "--local_rank=" not in parent:
                    out[rank] = int(pid)
    return out


def _wait_session(sid: int, timeout: float = 180) -> None:
    """Until no process of the launcher's session is left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getsid(int(pid)) == sid:
                    alive.append(int(pid))
            except (OSError, ProcessLookupError):
                continue
        if not alive:
            return
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _run_to_end(out: str, data: str, a, log) -> int:
    proc, port = _launch(out, data, a, log)
    rc = _wait(proc)
    _wait_session(proc.pid)
    _cleanup(port)
    return rc


def _kill_at(out: str, data: str, a, log, target: int, how: str) -> dict:
    """One launch, interrupted when the logged step reaches `target`: `how` = "kill" SIGKILLs a random rank,
    "term-save" SIGTERMs the launcher's process group as the checkpoint of step `target` is written."""
    start_ckpt, earlier = _ckpt_step(out), _key_lines(out)
    proc, port = _launch(out, data, a, log)
    t0, fired, rank = time.time(), None, None
    while proc.poll() is None:
        step = _last_step(out, earlier)
        if step >= target and fired is None:
            if how == "kill":
                pids = _rank_pids(proc.pid)
                if len(pids) == 2:
                    rank = random.choice(sorted(pids))
                    os.kill(pids[rank], signal.SIGKILL)
                    fired = step
            else:
                os.killpg(proc.pid, signal.SIGTERM)
                fired = step
        time.sleep(0.05)
    rc = proc.returncode
    # DeepSpeed's runner dies of the group SIGTERM at once, while its launch.py and the ranks finish (the
    # ranks save at the next step boundary, launch.py waits up to 30 s for them): wait for the whole session
    _wait_session(proc.pid)
    _cleanup(port)
    return {"how": how, "target": target, "fired_at_step": fired, "rank": rank, "rc": rc,
            "checkpoint_before": start_ckpt, "checkpoint_after": _ckpt_step(out), "seconds": time.time() - t0}


def _final_weights(out: str) -> dict:
    sys.path.insert(0, ROOT)
    from vlp.checkpoint import consolidated_state_dict, find_checkpoint

    return consolidated_state_dict(find_checkpoint(out).path)


def _kept_keys(out: str) -> Dict[int, List[str]]:
    """step -> the keys of both ranks in the last record of that step (the launch whose weights were kept)."""
    per_rank: Dict[int, Dict[int, List[str]]] = {}
    for path in sorted(glob.glob(os.path.join(out, "keys", "rank*.jsonl"))):
        rank = int(os.path.basename(path)[4:-6])
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line torn by the kill
                    continue
                per_rank.setdefault(rank, {})[rec["step"]] = rec["keys"]
    steps = sorted(set.intersection(*(set(d) for d in per_rank.values())))
    return {s: [k for r in sorted(per_rank) for k in per_rank[r][s]] for s in steps}


def _step_seconds(out: str) -> Optional[float]:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        sps = [r["samples_per_s"] for r in recs[1:] if r.get("samples_per_s")]
        return 32 / (sum(sps) / len(sps)) if sps else None
    except (OSError, ValueError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    random.seed(a.seed)
    import torch

    data = os.path.join(WORK, "data")
    if not os.path.isfile(os.path.join(data, "stats.json")):
        subprocess.run([sys.executable, "-m", "vlp.cli", "data", "synth", data, "--n", str(SAMPLES), "--split", "train",
                        "--samples-per-shard", "80", "--overwrite"], cwd=ROOT, env=_env(), check=True,
                       stdout=subprocess.DEVNULL)
    ref, run = os.path.join(WORK, "reference"), os.path.join(WORK, "faulted")
    for d in (ref, run):
        shutil.rmtree(d, ignore_errors=True)
    with open(os.path.join(WORK, "log.txt"), "w") as log:
        t0 = time.time()
        assert _run_to_end(ref, data, a, log) == 0, "the reference run failed: see .bench/faults/log.txt"
        ref_seconds = time.time() - t0
        events = []
        term_at = 1 + random.randint(0, 2)  # the SIGTERM during a save comes early, while saves are still ahead
        for i in range(1, a.kills + 2):
            done = _ckpt_step(run)
            if done >= a.steps:
                break
            if i == term_at and ((done // a.save_every) + 1) * a.save_every < a.steps:
                target = ((done // a.save_every) + 1) * a.save_every  # a save happens at this step
                events.append(_kill_at(run, data, a, log, target, "term-save"))
            elif len([e for e in events if e["how"] == "kill"]) < a.kills:
                events.append(_kill_at(run, data, a, log, random.randint(done + 1, a.steps - 1), "kill"))
        launches = 0
        while _ckpt_step(run) < a.steps and launches < 5:
            launches += 1
            _run_to_end(run, data, a, log)
    kills = [e for e in events if e["how"] == "kill" and e["fired_at_step"] is not None]
    term = [e for e in events if e["how"] == "term-save"]
    w_ref, w_run = _final_weights(ref), _final_weights(run)
    identical = sorted(w_ref) == sorted(w_run) and all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    keys_ref, keys_run = _kept_keys(ref), _kept_keys(run)
    per_epoch = SAMPLES // 32
    lost, repeated, epochs_ok = 0, 0, True
    for e in range(a.steps // per_epoch):
        got = [k for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1) for k in keys_run.get(s, [])]
        lost += SAMPLES - len(set(got))
        repeated += len(got) - len(set(got))
        epochs_ok &= sorted(got) == sorted({k for k in got}) and len(set(got)) == SAMPLES
    same_order = keys_ref == keys_run
    step_s = _step_seconds(ref) or 0.0
    lost_steps = [e["fired_at_step"] - e["checkpoint_after"] for e in kills]  # run since the kept checkpoint
    result = {"kills_survived": len(kills), "sigterm_during_save": [{k: e[k] for k in ("fired_at_step", "rc",
                                                                                     "checkpoint_after")}
                                                                    for e in term],
              "final_weights_bit_identical": identical, "samples_lost": lost, "samples_repeated": repeated,
              "every_epoch_exactly_once": epochs_ok, "same_keys_per_step_as_reference": same_order,
              "lost_steps_per_kill": lost_steps, "max_lost_steps": max(lost_steps, default=0),
              "mean_step_seconds": step_s, "max_lost_seconds": max(lost_steps, default=0) * step_s,
              "reference_seconds": ref_seconds, "events": events}
    # the SIGTERM arrived while step N's checkpoint was being written: that save completes and the ranks
    # save once more at the next step boundary, so the checkpoint left is at step N or later
    term_ok = bool(term) and all(e["checkpoint_after"] >= e["fired_at_step"] for e in term)
    result["sigterm_left_a_checkpoint_at_or_after_the_save"] = term_ok
    if a.json:
        print(json.dumps(result))
    else:
        print(f"kills survived: {len(kills)} (each a SIGKILL of a random rank at a random step); SIGTERM to the "
              f"launcher's process group during the save of step {[e['fired_at_step'] for e in term]}: checkpoint "
              f"left at step {[e['checkpoint_after'] for e in term]} ({'ok' if term_ok else 'NOT at or after the save'})")
        print(f"final weights bit-identical to the uninterrupted run: {identical}")
        print(f"samples lost: {lost}, repeated: {repeated} (every epoch exactly once: {epochs_ok}); same keys at "
              f"every step as the reference: {same_order}")
        print(f"work lost per kill: {lost_steps} steps (max {max(lost_steps, default=0)}, save_every "
              f"{a.save_every}) = at most {max(lost_steps, default=0) * step_s:.1f} s at {step_s:.2f} s/step")
    ok = identical and lost == 0 and repeated == 0 and term_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
