"""The hardware peak behind MFU: one function for the trainer and the benchmarks.

MFU = achieved model FLOP/s / peak FLOP/s. The peak comes from, in this order:

1. `train.peak_flops` (per device), when set;
2. on CUDA, a table of dense (no structured sparsity) tensor-core figures from the vendors' data
   sheets, per dtype: bf16/fp16 with fp32 accumulation, TF32 when torch allows it for matmuls, plain
   fp32 otherwise. An unknown GPU gets a one-line warning and no MFU, not a guess;
3. on CPU, a measurement: square fp32 (or the run's dtype) matmuls after a warm-up, the best of
   several large sizes, with the thread count the ranks on this host compute with. Ranks that share
   a host's cores share one measurement, taken by the host's first rank with all of their threads
   while the others wait, so the peak is that of the host, not of a rank timed against its neighbours.

The measured CPU peak is what a large matmul reaches, not a data-sheet figure: a model made of one
large linear layer scores close to 100% against it (tests/test_mfu.py), and real models less.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from vlp.dist import gather_objects, rank_and_world

log = logging.getLogger(__name__)

# Dense peak FLOP/s per GPU (vendor data sheets; sparsity figures halved away), matched in order on a
# substring of torch.cuda.get_device_name(): more specific names first ("L40S" before "L4").
# dtype keys: "bf16" (= fp16, fp32 accumulation), "tf32", "fp32" (no tensor cores).
GPU_PEAKS: List[Tuple[str, dict]] = [
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM5 ("H100 80GB HBM3")
    ("GH200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("B200", {"bf16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362.05e12, "tf32": 183.2e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("RTX 6000 Ada", {"bf16": 364.2e12, "tf32": 182.1e12, "fp32": 91.1e12}),
    ("RTX 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16, no TF32
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]

CPU_SIZES = (1024, 1536, 2048)


@dataclass
class Peak:
    """Peak FLOP/s of all ranks together (0: unknown, no MFU) and how it was obtained."""
    flops: float
    how: str


def _dtype_key(device: torch.device, dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def gpu_peak(name: str, dtype_key: str) -> Optional[float]:
    """The table's dense peak for a device name and "bf16"/"fp16"/"tf32"/"fp32"; None when unknown."""
    for pattern, peaks in GPU_PEAKS:
        if pattern in name:
            key = "bf16" if dtype_key == "fp16" and "fp16" not in peaks else dtype_key
            return peaks.get(key)
    return None


def measure_cpu_peak(dtype: torch.dtype = torch.float32, threads: Optional[int] = None,
                     sizes: Sequence[int] = CPU_SIZES, reps: int = 3, warmup_s: float = 0.2) -> float:
    """FLOP/s of square matmuls on this CPU with `threads` threads (default: torch's current count):
    warmed up for `warmup_s`, then the best of `reps` timings at each of `sizes`, best over sizes.
    The global RNG is left as it was."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.random.fork_rng(devices=[]):
            gen = torch.Generator().manual_seed(0)
            mats = {n: (torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype))
                    for n in sizes}
            a, b = mats[max(sizes)]
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < warmup_s:  # clocks up, caches and thread pool warm
                a @ b
            best = 0.0
            for n, (a, b) in mats.items():
                for _ in range(reps):
                    t = time.perf_counter()
                    a @ b
                    best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
            return best
    finally:
        torch.set_num_threads(previous)


def resolve_peak(configured: float, device: torch.device, dtype: torch.dtype, world: int = 1) -> Peak:
    """The peak of all `world` ranks for MFU. Collective when torch.distributed is initialised with
    several ranks (every rank must call it), so that ranks on one host share one CPU measurement."""
    key = _dtype_key(device, dtype)
    if configured > 0:
        return Peak(configured * world, f"train.peak_flops={configured:.3g} FLOP/s per device x {world}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = gpu_peak(name, key)
        if value is None:
            log.warning("MFU: no dense %s peak known for GPU %r; set train.peak_flops (FLOP/s per device) to "
                        "report MFU", key, name)
            return Peak(0.0, f"unknown GPU {name!r} ({key})")
        return Peak(value * world, f"{name}: dense {key} tensor-core peak {value / 1e12:.1f} TFLOP/s "
                                   f"(data sheet) x {world}")
    # CPU: the first rank of each host measures with all the threads its host's ranks compute with
    host = socket.gethostname()
    ranks = gather_objects((host, torch.get_num_threads()))
    rank = rank_and_world()[0] if len(ranks) > 1 else 0
    measured = None
    if rank == next(i for i, (h, _) in enumerate(ranks) if h == host):
        threads = min(sum(n for h, n in ranks if h == host), os.cpu_count() or 1)
        measured = (host, threads, measure_cpu_peak(dtype, threads))
    results = [m for m in gather_objects(measured) if m is not None]
    total = sum(m[2] for m in results)
    hosts = ", ".join(f"{h}: {p / 1e9:.1f} GFLOP/s with {n} threads" for h, n, p in results)
    return Peak(total, f"measured {str(dtype).replace('torch.', '')} matmul peak (best of "
                       f"{'/'.join(map(str, CPU_SIZES))} after warm-up; one measurement per host) {hosts}")


def mfu(flops_per_s: float, peak: float) -> Optional[float]:
    """flops_per_s / peak, or None when the peak is unknown."""
    return flops_per_s / peak if peak > 0 else None


OVER_100 = ("MFU {mfu:.0%} is above 100%: the peak ({how}) is below what the run achieves. Likely causes: "
            "train.peak_flops set too low or per host instead of per device, a CPU peak measured while other "
            "jobs loaded the machine, or a FLOP count that includes work the model did not do")


__all__ = ["GPU_PEAKS", "Peak", "gpu_peak", "measure_cpu_peak", "resolve_peak", "mfu", "OVER_100"]
