"""Process-group setup and the per-step agreement between ranks (stop / non-finite flags).

`deepspeed.init_distributed()` picks the backend from the accelerator: gloo on CPU, nccl on GPU.
A plain `python launch/pretrain.py` (no launcher) runs as a world of one. Signals only set a flag;
ranks act on it together at the next step boundary, after an all-reduce.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional

import torch


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


def _single_process_env() -> None:
    """Fill the env:// variables for a run started without a launcher (world of one)."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


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
    if not torch.distributed.is_initialized():
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


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    """Sum a short vector over all ranks (one collective); float64 keeps counts exact."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


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


__all__ = ["DistInfo", "setup_distributed", "all_reduce_sum", "all_gather_object", "barrier", "StopRequest"]
