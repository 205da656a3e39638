"""The training loop: DeepSpeed steps, per-step agreement between ranks, logs and checkpoints.

One optimizer step = `train.grad_accum` micro-batches of `train.micro_batch_size` per rank. By
default the contrastive negatives of each forward are the micro-batch gathered over ranks
(`micro_batch_size x world_size`), not the whole accumulated batch: accumulation grows the batch
the optimizer averages over, not the similarity matrix. `train.grad_cache=true` (dual encoders)
scores the whole accumulated batch instead (`micro_batch_size x grad_accum x world_size`
negatives) for about one extra forward per micro-batch; see `vlp.train.grad_cache`.

With `eval.every > 0`, zero-shot retrieval on `data.eval_shards` runs every that many steps (and
at the end) through `vlp.eval`, logged as `eval/*` in the same records.

At every step boundary the ranks all-reduce one small vector (loss, metrics, token count,
non-finite flag, stop flag), so they stop together: on a non-finite loss (reported with the step
and the batch keys, no checkpoint written) or after SIGINT/SIGTERM (a checkpoint is written first).
Resume restores model, optimizer, schedule, each rank's data position and RNG states, so on CPU
fp32 the losses after a resume equal those of an uninterrupted run. On another number of ranks or
ZeRO stage the checkpoint is re-partitioned (`vlp.train.reshard`) and the data loader re-splits the rest of
the epoch; with another global batch the schedule and the end of the run follow samples seen
(`vlp.train.schedule`), so the loop runs until `train.steps` reference batches of samples are seen.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from vlp import checkpoint as ckpt
from vlp.config import ConfigError, frames_at, persisted_dict, persisted_yaml
from vlp.data import build_train_loader
from vlp.data.shards import expand_shards
from vlp.data.transforms import DeviceNormalize, decode_on_device, resolve_image_cfg
from vlp.data.tokenizers import build_tokenizer
from vlp.eval.evaluate import run_retrieval_eval
from vlp.dist import DistInfo, StopRequest, all_reduce_sum, gather_objects, setup_distributed
from vlp.models import build_model, check_tokenizer, flops_per_sample, param_groups
from vlp.train.ds_config import deepspeed_config, resolve_precision
from vlp.train.engine import build_engine, clamp_parameters, use_channels_last
from vlp.train.grad_cache import check_model, grad_cache_step
from vlp.train.init_from import init_from
from vlp.train.init_sources import bad_path
from vlp.train.metrics import MetricsWriter, check_wandb
from vlp.train.reshard import load_resharded
from vlp.train.mfu import OVER_100, Peak, resolve_peak

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: names the step and the keys of the offending batches."""


@dataclass
class TrainResult:
    step: int
    samples_seen: int
    checkpoint: Optional[str] = None
    stopped_by: int = 0  # signal number when a SIGINT/SIGTERM ended the run early
    last: Dict[str, Any] = field(default_factory=dict)  # the last logged record


def check_before_work(cfg: DictConfig, probe_lock: bool = True) -> None:
    """Everything that can be checked without starting processes or building the model (`probe_lock`:
    also whether another job holds output_dir's lock; the ranks themselves take it in `train`)."""
    t = cfg.train  # value ranges are checked with the schema (vlp.config); these need the machine or files
    check_wandb(t.wandb)
    resolve_precision(t.precision)
    deepspeed_config(cfg, 1)  # rejects train.deepspeed keys that contradict ours
    probe = ckpt.RunLock(cfg.output_dir)  # another job training into output_dir: refuse now, clearly
    if probe_lock and os.path.isdir(cfg.output_dir):
        if not probe.acquire():
            raise probe.in_use_error()
        probe.release()
    resume_from = ckpt.find_resume(cfg.output_dir, t.resume)
    ckpt.check_run_dir(cfg.output_dir, resume_from)  # never prune or mix with another run's checkpoints
    init = cfg.model.init_from
    if init and not os.path.isdir(init) and resume_from is None:
        raise bad_path(init, "is not a directory")  # a resumed run does not read it
    _check_shards(cfg)


def _check_shards(cfg: DictConfig) -> None:
    specs = [("data.train_shards", cfg.data.train_shards)] if cfg.data.train_shards else []
    specs += [(f"data.sources[{i}].shards", s.shards) for i, s in enumerate(cfg.data.sources) if s.kind == "shards"]
    if not specs and not any(s.kind == "hf" for s in cfg.data.sources):
        raise ConfigError("no training data: set data.train_shards (a directory, brace pattern or '::' list) "
                          "or data.sources")
    if cfg.eval.every:
        specs.append(("data.eval_shards", cfg.data.eval_shards))
    for key, spec in specs:
        expand_shards(spec, what=key)  # raises ConfigError naming the key


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _to_device(batch: Dict[str, Any], device: torch.device, float_dtype: torch.dtype,
               normalize: Optional[DeviceNormalize] = None) -> Dict[str, Any]:
    """Tensors to `device` (non-blocking: the loader pins them on CUDA hosts); the loader's uint8 images are
    normalised there (`normalize`), other floats cast to the run's dtype."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k in ("image", "video") and normalize is not None:
                v = normalize(v, float_dtype)
            elif v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def _scalar_metrics(out: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    """The model output's named scalars (`loss` and e.g. each objective's loss), detached, on `device`."""
    res = {}
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            res[k] = torch.tensor(float(v), device=device)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            res[k] = v.detach().float().reshape(()).to(device)
    return res


class _Batches:
    """Endless micro-batches from a loader that may end per epoch.

    Fetching runs under `fork_rng`: whatever the loader draws from torch's global generator (a
    DataLoader draws its base seed when an epoch's iterator starts) leaves the training stream
    alone, so a resumed run's model randomness matches an uninterrupted one. Loaders must seed
    their own randomness (ours does, from seed, epoch, rank and worker).
    """

    def __init__(self, loader: Iterable, device: torch.device):
        self.loader = loader
        self.it = None
        self.devices = [device] if device.type == "cuda" else []

    def _next(self) -> Dict[str, Any]:
        if self.it is None:
            self.it = iter(self.loader)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                raise RuntimeError("the training loader yielded no batch for a whole epoch: too few samples "
                                   "per rank for train.micro_batch_size?") from None

    def next(self) -> Dict[str, Any]:
        with torch.random.fork_rng(devices=self.devices):
            return self._next()


_SUMMED = ("samples", "batches", "repeated", "skipped/", "mix_counts/")  # loader counters added over ranks


def _loader_stats(loader, device: torch.device) -> Dict[str, float]:
    """The loader's numeric stats, nested dicts flattened to `a/b`; counters summed over ranks,
    the rest (epoch, per-epoch sizes, mix fractions) as rank 0 sees them."""
    flat = {k: float(v) for k, v in sorted(_flat(loader.stats() if hasattr(loader, "stats") else {}, sep="/").items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summed = [k for k in flat if any(k == p or (p.endswith("/") and k.startswith(p)) for p in _SUMMED)]
    flat.update(all_reduce_sum({k: flat[k] for k in summed}, device))
    return flat


def _warn_config_changes(checkpoint: str, cfg: DictConfig) -> None:
    path = os.path.join(checkpoint, "config.yaml")
    if not os.path.isfile(path):
        return
    old = _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False))  # both as persisted: unresolved
    new = _flat(persisted_dict(cfg))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "train.resume")
    if changed:
        print(f"vlp train: warning: config differs from the checkpoint's in {', '.join(changed)}",
              file=sys.stderr, flush=True)


def _flat(d: Any, prefix: str = "", sep: str = ".") -> Dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix[:-len(sep)] if prefix else "": d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}{sep}", sep))
    return out


def _restore_loader(loader, state: Dict[str, Any], rank: int, world: int) -> None:
    """Give the loader its position: every rank's saved state when it can re-split them over a new layout
    (`load_states`, ours can), else this rank's own, which needs the checkpoint's world size."""
    if hasattr(loader, "load_states"):
        loader.load_states(state["loaders"])
    elif state["loader"] is not None:
        loader.load_state_dict(state["loader"])
    else:
        raise ckpt.CheckpointError(
            f"the checkpoint was written by {state['world_size']} rank(s), this run has {world}, and the training "
            f"loader ({type(loader).__name__}) has no load_states() to re-split its position over the new ranks")


def _warn_batch_change(scheduler, samples_seen: int, step: int, cfg: DictConfig, world: int) -> None:
    """One warning when the global batch differs from the run's reference batch: the schedule goes on by samples."""
    t = cfg.train
    batch = int(t.micro_batch_size) * int(t.grad_accum) * world
    ref = int(getattr(scheduler, "ref_batch", batch))
    if ref == batch:
        return
    total = int(getattr(scheduler, "total_samples", int(t.steps) * ref))
    left = max(0, -(-(total - samples_seen) // batch))
    print(f"vlp train: warning: the global batch is {batch} (micro_batch_size {t.micro_batch_size} x grad_accum "
          f"{t.grad_accum} x {world} rank(s)); the run started with {ref}. The learning-rate schedule continues by "
          f"samples seen ({samples_seen} of {total}; train.steps and train.warmup_steps count batches of {ref}), "
          f"so the run ends after {left} more steps, at step {step + left}. The learning rate is not rescaled: "
          "set train.lr yourself if the new batch needs another", file=sys.stderr, flush=True)


def _total_samples(engine, cfg: DictConfig, world: int) -> int:
    """Samples the run trains on: `train.steps` batches of its reference global batch (see vlp.train.schedule)."""
    t = cfg.train
    return int(getattr(engine.lr_scheduler, "total_samples",
                       int(t.steps) * int(t.micro_batch_size) * int(t.grad_accum) * world))


def default_loader(cfg: DictConfig, model: torch.nn.Module, rank: int, world_size: int):
    """The data pipeline's loader for this rank, with the tokenizer checked against the text tower."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    check_tokenizer(model, tokenizer)
    return build_train_loader(cfg, model.image_cfg, tokenizer, rank, world_size)


def train(cfg: DictConfig, make_loader: Optional[Callable] = None) -> TrainResult:
    """Train `cfg` on this process's rank; every rank calls it.

    `make_loader(cfg, model, rank, world_size)` (default: `default_loader`) returns an iterable of
    micro-batches with `state_dict()`/`load_state_dict()` (and optionally `stats()`).
    """
    check_before_work(cfg, probe_lock=False)
    info = setup_distributed(int(cfg.train.dist_timeout_s))
    lock = ckpt.RunLock(cfg.output_dir)
    held = info.rank != 0 or lock.acquire()  # rank 0 holds it for the whole run; every rank learns the outcome
    if all_reduce_sum({"busy": float(not held)}, info.device)["busy"]:
        raise lock.in_use_error()
    try:
        return _train(cfg, make_loader, info)
    finally:
        lock.release()


def _train(cfg: DictConfig, make_loader: Optional[Callable], info: DistInfo) -> TrainResult:
    t = cfg.train
    rank, world = info.rank, info.world_size
    precision = resolve_precision(t.precision)
    float_dtype = _DTYPES[precision]
    out_dir = cfg.output_dir
    config_yaml = persisted_yaml(cfg)  # env interpolations unresolved, URL credentials removed
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        ckpt.write_atomic(os.path.join(out_dir, "config.yaml"), config_yaml.encode())

    # rank 0 resolves the checkpoint and every rank takes its answer: on several nodes each would otherwise
    # read `latest` from its own view of the filesystem (`ckpt.load` then checks each rank has its files)
    resume_from = gather_objects(ckpt.find_resume(out_dir, t.resume) if rank == 0 else None)[0]
    ckpt.check_run_dir(out_dir, resume_from)
    _seed_all(int(t.seed))  # same seed on every rank: identical initial weights
    model = build_model(cfg.model)
    # a resumed run restores every weight from its checkpoint: model.init_from (maybe gone by now) is skipped
    if resume_from is None and cfg.model.init_from:
        model.init_report = init_from(model, cfg.model)
        if rank == 0:
            for line in model.init_report["lines"]:
                print(f"vlp train: init_from {cfg.model.init_from}: {line}", file=sys.stderr, flush=True)
    if t.grad_cache:
        check_model(model)
    image_size = int(cfg.data.image_size or model.image_cfg["size"])
    ds_cfg = deepspeed_config(cfg, world, n_params=sum(p.numel() for p in model.parameters()))
    groups = param_groups(model, float(t.weight_decay))
    # counted on the whole model, before ZeRO-3 partitions its weights
    flops_by_frames = _flops_by_frames(model, cfg, image_size)
    flops_sample = flops_by_frames.get(0) or flops_by_frames[_frames(cfg, 0)]
    # NHWC images only: a convolution given NHWC input computes NHWC, layer after layer; the weights stay
    # contiguous (DeepSpeed broadcasts and flattens parameters as plain contiguous tensors)
    channels_last = use_channels_last(model, str(t.channels_last))
    engine, optimizer, scheduler = build_engine(model, groups, cfg, ds_cfg, info.device)
    loader = (make_loader or default_loader)(cfg, model, rank, world)
    peak = resolve_peak(float(t.peak_flops), info.device, float_dtype, world)
    if rank == 0:
        print(f"vlp train: MFU against {peak.flops / 1e9:.4g} GFLOP/s: {peak.how}; {flops_sample / 1e6:.4g} MFLOP "
              "per training sample (one counted forward + backward)", file=sys.stderr, flush=True)

    step, samples_seen = 0, 0
    if resume_from is not None:
        resume_from, state = ckpt.load(engine, resume_from, rank, world, info.device, fallback=t.resume == "auto")
        if state["reshard"]:
            load_resharded(engine, resume_from, rank)
        step, samples_seen = state["step"], state["samples_seen"]
        _restore_loader(loader, state, rank, world)
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        else:  # another world size: no rank's RNG state is this rank's; seeded from the seed, step and rank
            _seed_all(int(t.seed) + 1_000_003 * step + rank)
        if rank == 0:
            print(f"vlp train: resumed from {resume_from} at step {step}", file=sys.stderr, flush=True)
            if state["reshard"]:
                print(f"vlp train: the checkpoint was written by {state['world_size']} rank(s) at ZeRO stage "
                      f"{state['zero_stage']}, this run has {world} at stage {int(t.zero_stage)}: weights, AdamW "
                      "moments and step, schedule and model state (queues, momentum towers) re-partitioned from "
                      "whole per-parameter tensors; RNG streams re-seeded from train.seed, the step and the rank",
                      file=sys.stderr, flush=True)
            _warn_batch_change(engine.lr_scheduler, samples_seen, step, cfg, world)
            _warn_config_changes(resume_from, cfg)
    else:
        _seed_all(int(t.seed) + rank)  # per-rank streams for dropout and the like

    wandb_cfg = {"project": t.wandb_project, "config": persisted_dict(cfg)} if t.wandb else None
    writer = MetricsWriter(out_dir, rank, step, t.tensorboard, wandb_cfg)
    result = TrainResult(step=step, samples_seen=samples_seen)
    try:
        with StopRequest() as stop:
            norm = resolve_image_cfg(model.image_cfg, cfg.data)
            result = _run(TrainState(cfg, engine, optimizer, loader, writer, info, stop, step, samples_seen,
                                     float_dtype, flops_sample, peak, config_yaml,
                                     DeviceNormalize(norm["mean"], norm["std"], channels_last), flops_by_frames))
    finally:
        writer.close()
    return result


def _log_keys(output_dir: str, rank: int, step: int, keys: List[List[str]]) -> None:
    """`train.log_keys`: this rank's sample keys of `step`, one JSON line appended to keys/rank{rank}.jsonl.
    After a resume the steps since the checkpoint are logged again: the last record of a step is the one
    whose weights were kept (benchmarks/faults.py checks every sample is consumed once per epoch with it)."""
    path = os.path.join(output_dir, "keys", f"rank{rank}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "keys": [k for ks in keys for k in ks]}) + "\n")


CURVES_EVERY_S = 60.0  # curves.png at a checkpoint at most this often (a redraw takes ~2 s on a CPU core)


def _draw_curves(output_dir: str, bar) -> None:
    """Redraw output_dir/curves.png from metrics.jsonl; a failure warns and training goes on."""
    from vlp.train.curves import write_run_curves
    try:
        write_run_curves(output_dir)
    except Exception as e:  # a picture must never stop a run
        bar.write(f"vlp train: warning: could not draw {output_dir}/curves.png: {type(e).__name__}: {e}", file=sys.stderr)


def _evaluate(model, cfg: DictConfig, info: DistInfo) -> Dict[str, float]:
    """Retrieval on data.eval_shards with the live model (collective), off the training RNG stream."""
    with torch.random.fork_rng(devices=[info.device] if info.device.type == "cuda" else []):
        res = run_retrieval_eval(model, cfg, info.rank, info.world_size)
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class TrainState:
    """What the step loop works with: the run's config and machinery, and where it stands."""
    cfg: DictConfig
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    loader: Any  # iterable of micro-batches with state_dict()/load_state_dict()[/stats()]
    writer: MetricsWriter
    info: DistInfo
    stop: StopRequest
    step: int  # optimizer steps done
    samples_seen: int
    float_dtype: torch.dtype
    flops_sample: float  # training FLOPs per sample (vlp.models.flops_per_sample)
    peak: Peak  # peak FLOP/s of all ranks' hardware, for MFU (flops 0: unknown)
    config_yaml: str  # stored with every checkpoint
    normalize: Optional[DeviceNormalize] = None  # the loader's uint8 images -> normalised, on the device
    flops_by_frames: Dict[int, float] = field(default_factory=dict)  # video models: per frame count


def _frames(cfg: DictConfig, step: int) -> int:
    """Frames per clip at `step` for a video model (the curriculum), 0 for an image model."""
    if not cfg.model.video.enabled:
        return 0
    return frames_at(cfg.data.video.curriculum, cfg.data.video.frames, step)


def _flops_by_frames(model, cfg: DictConfig, image_size: int) -> Dict[int, float]:
    """Training FLOPs per sample, per frame count a video run's curriculum uses ({0: ...} for images). A
    batch that mixes images (1-frame clips) with clips costs less than its stage's figure: MFU is then a
    lower bound."""
    ctx = int(cfg.data.tokenizer.context_length)
    if not cfg.model.video.enabled:
        return {0: float(flops_per_sample(model, image_size, ctx))}
    v = cfg.data.video
    out = {}
    for k in sorted({int(v.frames)} | {int(e[1]) for e in v.curriculum} | {_frames(cfg, 0)}):
        model.example_frames = k
        out[k] = float(flops_per_sample(model, image_size, ctx))
    model.example_frames = 0
    return out


def _run(state: TrainState) -> TrainResult:
    cfg, engine, optimizer, loader, writer = state.cfg, state.engine, state.optimizer, state.loader, state.writer
    info, stop, step, samples_seen = state.info, state.stop, state.step, state.samples_seen
    float_dtype, flops_sample, peak, config_yaml = state.float_dtype, state.flops_sample, state.peak, state.config_yaml
    t = cfg.train
    rank, world = info.rank, info.world_size
    ga, mb = int(t.grad_accum), int(t.micro_batch_size)
    grad_cache = bool(t.grad_cache) and ga > 1  # with one micro-batch it is the plain step
    batches = _Batches(loader, info.device)
    v = cfg.data.video
    if cfg.model.video.enabled and len({int(v.frames)} | {int(e[1]) for e in v.curriculum}) > 1 \
            and not hasattr(loader, "set_frames"):
        raise ConfigError(f"data.video.curriculum changes the frames per clip, but the training loader "
                          f"({type(loader).__name__}) has no set_frames(k): use vlp's loader or give it one")
    total_samples = _total_samples(engine, cfg, world)
    steps_total = step + max(0, -(-(total_samples - samples_seen) // (mb * ga * world)))  # t.steps unless the batch changed
    bar = tqdm(total=steps_total, initial=step, disable=rank != 0, dynamic_ncols=True, mininterval=1.0,
               unit="step", file=sys.stderr)
    result = TrainResult(step=step, samples_seen=samples_seen)
    window_t0, window_steps, window_tokens = time.perf_counter(), 0, 0.0
    warned_mfu, curves_at = False, time.perf_counter()
    while samples_seen < total_samples:
        frames = _frames(cfg, step)
        if frames and hasattr(loader, "set_frames") and loader.set_frames(frames):
            batches.it = None  # the workers restart at the loader's exact position, decoding `frames` per clip
            if rank == 0:
                bar.write(f"step {step}: clips of {frames} frame(s) from here on (data.video.curriculum)")
        flops_sample = state.flops_by_frames.get(frames, flops_sample)
        lr = optimizer.param_groups[0]["lr"]
        metrics: List[Dict[str, torch.Tensor]] = []
        keys: List[List[str]] = []
        tokens = torch.zeros((), device=info.device)
        chunks = []
        for _ in range(ga):
            batch = batches.next()
            keys.append(list(batch.get("key", [])))
            if "jpeg" in batch:  # data.decode=device: the JPEGs are decoded here, on the device
                batch = decode_on_device(batch, info.device, str(cfg.data.interpolation))
            batch = _to_device(batch, info.device, float_dtype, state.normalize)
            if "text_mask" in batch:
                tokens += batch["text_mask"].sum()
            if grad_cache:
                chunks.append(batch)
                continue
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            metrics.append(_scalar_metrics(out, info.device))
        if grad_cache:  # one loss over all chunks
            metrics.append(_scalar_metrics(grad_cache_step(engine, chunks, info.device), info.device))
            keys = [[k for ks in keys for k in ks]]
        clamp_parameters(engine.module, optimizer)  # learnable temperatures back in range, master copies too
        if hasattr(engine.module, "after_step"):
            engine.module.after_step()
        step += 1
        samples_seen += mb * ga * world
        final = samples_seen >= total_samples
        if t.log_keys:
            _log_keys(cfg.output_dir, rank, step, keys)
        names = sorted(k for k in metrics[0] if k != "loss")
        per_micro = torch.stack([torch.stack([m["loss"]] + [m[k] for k in names]) for m in metrics]).cpu()
        finite = torch.isfinite(per_micro[:, 0]).tolist()
        bad_local = [k for k, ok in zip(keys, finite) if not ok]
        red = all_reduce_sum({**{f"metric/{k}": v for k, v in zip(["loss"] + names, per_micro.mean(0).tolist())},
                              "tokens": float(tokens), "nonfinite_ranks": float(bool(bad_local)),
                              "stop_ranks": float(stop.signum != 0)}, info.device)
        loss = red["metric/loss"] / world
        if red["nonfinite_ranks"] > 0:
            bad = [k for per_rank in gather_objects(bad_local) for ks in per_rank for k in ks]
            raise NonFiniteLossError(f"non-finite loss at step {step} (mean over ranks: {loss}); "
                                     f"keys of the batches with a non-finite loss: {bad}")
        stopping = red["stop_ranks"] > 0
        window_steps += 1
        window_tokens += red["tokens"]
        bar.update(1)
        evals: Dict[str, float] = {}
        if cfg.eval.every and (step % cfg.eval.every == 0 or final):
            t_eval = time.perf_counter()
            evals = _evaluate(engine.module, cfg, info)
            window_t0 += time.perf_counter() - t_eval  # keep eval time out of the throughput figures
            if rank == 0:
                bar.write(f"step {step}: retrieval " + ", ".join(f"{k}={evals[k]:.3f}" for k in
                                                                   ("i2t_r1", "t2i_r1", "mean_recall") if k in evals))
        if step % t.log_every == 0 or final or stopping or evals:
            stats = _loader_stats(loader, info.device)
            dt = max(time.perf_counter() - window_t0, 1e-9)
            sps = window_steps * mb * ga * world / dt
            record = {"step": step, "loss": loss}
            record.update({k: red[f"metric/{k}"] / world for k in names})
            record.update({"lr": lr, "samples_per_s": sps, "tokens_per_s": window_tokens / dt,
                           "flops_per_s": sps * flops_sample, "samples_seen": samples_seen})
            if peak.flops > 0:
                record["mfu"] = sps * flops_sample / peak.flops
                if record["mfu"] > 1.0 and rank == 0 and not warned_mfu:
                    warned_mfu = True
                    bar.write("vlp train: warning: " + OVER_100.format(mfu=record["mfu"], how=peak.how), file=sys.stderr)
            record.update({f"data/{k}": v for k, v in stats.items()})
            record.update({f"eval/{k}": v for k, v in evals.items()})
            writer.log(record)
            result.last = record
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{sps:.1f}", refresh=False)
            window_t0, window_steps, window_tokens = time.perf_counter(), 0, 0.0
        if stopping or final or (t.save_every and step % t.save_every == 0):
            result.checkpoint = ckpt.save(engine, cfg.output_dir, step, samples_seen, loader.state_dict(),
                                          config_yaml, rank, world, int(t.keep_last))
            if rank == 0 and t.curves and (final or stopping or time.perf_counter() - curves_at > CURVES_EVERY_S):
                t_draw = time.perf_counter()
                _draw_curves(cfg.output_dir, bar)
                curves_at = time.perf_counter()
                window_t0 += curves_at - t_draw  # keep drawing time out of the throughput figures
        if stopping:
            result.stopped_by = stop.signum or signal.SIGTERM
            break
    bar.close()
    if result.checkpoint is None:  # resumed at the final step: nothing was left to do
        result.checkpoint = ckpt.find_resume(cfg.output_dir, "auto")
    result.step, result.samples_seen = step, samples_seen
    return result


__all__ = ["train", "TrainResult", "NonFiniteLossError", "check_before_work"]
