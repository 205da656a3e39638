"""Distributed glue for every part of vlp: process groups, collectives, free ports, launcher commands.

- Training joins through `deepspeed.init_distributed()` (gloo on CPU, nccl on GPU); a plain
  `python launch/pretrain.py` (no launcher) runs as a world of one. Signals only set a flag
  (`StopRequest`); ranks act on it together at the next step boundary, after an all-reduce.
- Work one rank does for all (counting remote shards: `vlp.data`) runs on rank 0 and is broadcast
  (`run_on_rank0`), its exception included, so no rank waits for an answer that never comes.
- Evaluation runs as a world of one without a launcher; under `deepspeed --module vlp.eval`
  (`launcher_command`) every rank encodes its share and `gather_objects` brings the pieces together.
- Losses that need the global batch all-gather with gradient (`gather_with_grad`), through
  `torch.distributed._functional_collectives.all_gather_single`, whose backward is a reduce-scatter
  (sum): each rank's features receive the gradient every rank's loss sends them
  (`torch.distributed.nn.functional.all_gather` is deprecated in torch 2.14). Without an initialised
  process group, or with one rank, tensors pass through unchanged.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SINGLE = "VLP_SINGLE_PROCESS_PORT"  # marks env:// variables vlp filled in for a world of one


def _single_process_env() -> None:
    """Fill the env:// variables for a run started without a launcher (world of one). They stay set while
    the process group lives, so a process that trains in-process (a notebook, a test) passes them to its
    children; a child that finds vlp's own marker but no process group of its own is not a rank of that
    world: it takes a fresh port instead of colliding with its parent's or a sibling's."""
    inherited = os.environ.get(_SINGLE) is not None and os.environ.get(_SINGLE) == os.environ.get("MASTER_PORT") \
        and not dist.is_initialized()
    if "WORLD_SIZE" in os.environ and not inherited:
        return
    port = str(free_port()) if inherited else os.environ.get("MASTER_PORT", str(free_port()))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, **{_SINGLE: port})


def setup_distributed(timeout_s: int) -> DistInfo:
    """Initialise (once per process) the default process group and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
        if acc.device_name() == "cpu":
            path = _shm_buffer_path()
            if path and not _SHM_BUFFERS:
                atexit.register(release_shm_buffer)
            if path:
                _SHM_BUFFERS.append(path)
    return DistInfo(rank, world, local_rank, local_world, device)


_SHM_BUFFERS: List[str] = []  # buffer names of the process groups this process set up


def _shm_buffer_path() -> Optional[str]:
    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank):
        return None
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers in /dev/shm (~66 MB of RAM each).

    DeepSpeed's shm comm op creates `deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}` and never
    removes it, so every finished CPU run leaked RAM until the machine swapped. The names are recorded
    when the group is set up (a caller may have changed the env:// variables since), plus the one the
    current environment names. Unlinking only drops the name: peers that still have it mapped keep
    working."""
    current = _shm_buffer_path()
    for path in set(_SHM_BUFFERS + ([current] if current else [])):
        try:
            os.unlink(path)
        except OSError:  # never created (world of one, GPU run) or already gone
            pass
    _SHM_BUFFERS.clear()


def all_reduce_sum(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Sum named scalars over all ranks in one collective; float64 keeps counts exact."""
    names = list(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    if names and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def gather_objects(obj: Any, world_size: Optional[int] = None) -> List[Any]:
    """Every rank's picklable `obj`, in rank order (a list of one without a process group, or when the
    caller's `world_size` is 1: a rank evaluating alone inside a bigger group)."""
    if world_size == 1 or not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_rank0(fn: Callable[[], Any]) -> Any:
    """`fn()` run by rank 0 alone, its result (picklable) given to every rank; an exception it raises is
    raised on every rank (rank 0: the original; the others: a copy, or a RuntimeError with its message),
    so no rank is left waiting. Without a process group, or with one rank, just `fn()`. Every rank calls it.
    The others wait in a broadcast: at most the group's timeout (train.dist_timeout_s)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: List[Any] = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:
            error = e
            try:
                copy = pickle.loads(pickle.dumps(e))
            except Exception:
                copy = RuntimeError(f"{type(e).__name__}: {e}")
            box = [("error", copy)]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if error is not None:
            raise error
        raise value
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def join_launcher_group() -> Tuple[int, int, torch.device]:
    """(rank, world_size, device) for evaluation: joins the env:// process group (plain torch, no
    DeepSpeed engine) when a launcher set WORLD_SIZE > 1, else stays a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def launcher_command(nproc: int, target: Sequence[str], master_port: Optional[int] = None) -> List[str]:
    """The DeepSpeed launcher command line that starts `nproc` local ranks of `target` (a script path and
    its arguments, or `["--module", name, ...]`), on `master_port` or, by default, a free one: two runs
    on one host would both take DeepSpeed's 29500 and the second would hang."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(master_port or free_port())] + list(target)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SIGINT/SIGTERM to the whole process group (Ctrl-C, SLURM's --signal,
    `docker stop`, DeepSpeed's launcher) must reach the rank, which saves and exits at the next step
    boundary; by default they killed the workers first and the rank died on "DataLoader worker killed
    by signal" without a checkpoint. The workers end with the rank: the DataLoader shuts them down, and
    `kill_workers_at_exit` kills any it left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # forked with them blocked (`stop_signals_blocked`): one that arrived meanwhile is pending, now discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGINT/SIGTERM blocked in this thread while DataLoader workers are forked. A worker inherits the mask,
    so a signal to the process group that lands before its `worker_init_fn` (`ignore_stop_signals`) has
    run stays pending and is discarded, instead of killing the worker by PyTorch's worker SIGTERM handler
    (the rank then died on "DataLoader worker killed by signal": a race at every epoch's worker start).
    The rank itself receives the signal when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_KILL_AT_EXIT: List[bool] = []


def kill_workers_at_exit() -> None:
    """Make sure DataLoader workers cannot keep the rank alive at exit: they ignore SIGTERM
    (`ignore_stop_signals`), and multiprocessing's own exit handler ends leftover daemonic workers
    with SIGTERM and then waits for them, forever when one was still busy (a worker the loader had just
    started for the next epoch when training ended). This handler, registered after multiprocessing's
    and so run before it, SIGKILLs the children that are still alive: they only read shards. Idempotent;
    call it in the process that creates the DataLoader."""
    if _KILL_AT_EXIT:
        return
    _KILL_AT_EXIT.append(True)
    import atexit
    import multiprocessing

    def kill() -> None:
        for child in multiprocessing.active_children():
            try:
                child.kill()
                child.join(timeout=5)
            except Exception:  # exiting anyway: never let cleanup raise
                pass

    atexit.register(kill)


def run_forwarding_signals(cmd: List[str]) -> int:
    """Run a launcher command and wait for it; SIGINT/SIGTERM received here are passed on to it (and so to
    the ranks, which save and stop) instead of orphaning it. Returns its exit code, or 128 + the signal
    when one stopped the run."""
    import subprocess

    proc = subprocess.Popen(cmd)
    got: List[int] = []

    def forward(signum, frame):
        if not got:
            got.append(signum)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 + got[0] if got else rc


class StopRequest:
    """SIGINT/SIGTERM set a flag (the signal number); a second SIGINT interrupts at once.

    Used as a context manager so that the previous handlers come back when training ends.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rank_and_world(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = group or dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank along dim 0, rank order; differentiable.

    Every rank must pass the same shape (drop partial batches: gloo raises, NCCL hangs).
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    from torch.distributed import _functional_collectives as fc

    out = fc.all_gather_single(x.contiguous(), 0, group or dist.group.WORLD)
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out


class _NeighbourExchange(torch.autograd.Function):
    """Send `x` to rank `to`, receive the same-shaped tensor from rank `frm` (a ring step); the gradient
    travels back the other way (what was received from `frm` has its gradient sent back to `frm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, to: int, frm: int, group) -> torch.Tensor:
        ctx.to, ctx.frm, ctx.group = to, frm, group
        out = torch.empty_like(x)
        _exchange(x.contiguous(), out, to, frm, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = torch.empty_like(grad)
        _exchange(grad.contiguous(), back, ctx.frm, ctx.to, ctx.group)
        return back, None, None, None


def _exchange(send: torch.Tensor, recv: torch.Tensor, to: int, frm: int, group) -> None:
    group = group or dist.group.WORLD
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, to), group),
           dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, frm), group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def ring_shift(x: torch.Tensor, steps: int = 1, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The `x` of the rank `steps` places to the left (rank r gets rank r - steps's), differentiable:
    one neighbour exchange per call, so a loop over ranks holds one remote block at a time."""
    rank, world = rank_and_world(group)
    if world == 1 or steps % world == 0:
        return x
    return _NeighbourExchange.apply(x, (rank + steps) % world, (rank - steps) % world, group)

