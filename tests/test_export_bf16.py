"""bf16 checkpoints (2 CPU ranks, gloo) at ZeRO 0, 1, 2, 3, and DeepSpeed's BF16_Optimizer, export their
fp32 master weights, not the bf16-rounded module weights.

What DeepSpeed 0.19 writes for `train.precision=bf16` with our client AdamW:
- ZeRO 0: FP16_UnfusedOptimizer; `mp_rank_00_model_states.pt` holds the bf16 module and, unnamed, the
  optimizer's fp32 masters (`fp32_groups`); vlp records their names in the client state;
- ZeRO 1-3: `bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (fp32 partitions, read by `zero_to_fp32`);
- ZeRO 1 with `data_types.grad_accum_dtype: fp32`: BF16_Optimizer, whose `bf16_zero_pp_rank_*` files
  `zero_to_fp32` rejects ("is not a zero checkpoint").

As a script (under `deepspeed --num_gpus 2`) this file is each rank's entry: for each run, 2 optimizer
steps of a tiny CLIP in bf16 on fixed batches (each rank its half), a checkpoint in vlp's layout
(`vlp.checkpoint.save`), and as the reference the live fp32 masters of the optimizer and the bf16 module
weights (`reference.pt`, rank 0).
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run as a script by the launcher: `tests` importable
from tests.dist.train_entry import deepspeed_launch, two_steps_and_save  # noqa: E402
from tests.test_export_zero3 import TINY  # noqa: E402

pytestmark = pytest.mark.slow
RUNS = {"zero0": ["train.zero_stage=0"], "zero1": ["train.zero_stage=1"], "zero2": ["train.zero_stage=2"],
        "zero3": ["train.zero_stage=3"],
        "bf16_optimizer": ["train.zero_stage=1", "train.deepspeed.data_types.grad_accum_dtype=fp32"]}
OPTIMIZERS = {"zero0": "FP16_UnfusedOptimizer", "zero1": "DeepSpeedZeroOptimizer", "zero2": "DeepSpeedZeroOptimizer",
              "zero3": "DeepSpeedZeroOptimizer_Stage3", "bf16_optimizer": "BF16_Optimizer"}
REFERENCE = "reference.pt"


def _fp32_masters(engine):
    """name -> the optimizer's live fp32 master of each trainable parameter (a collective under ZeRO)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    unfused = {}
    if type(opt).__name__ == "FP16_UnfusedOptimizer":  # no ZeRO: parallel lists of bf16 params and fp32 masters
        unfused = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    masters, low = {}, {}
    for name, p in engine.module.named_parameters():
        masters[name] = (unfused[id(p)] if unfused else safe_get_full_fp32_param(p)).detach().clone().float()
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            low[name] = p.detach().clone()
    return masters, low


def rank_main(out: str, config: str) -> None:
    from vlp.config import load_config
    from vlp.dist import setup_distributed

    info = setup_distributed(120)
    for name, overrides in RUNS.items():
        cfg = load_config(config, [f"output_dir={out}/{name}", "train.precision=bf16"] + overrides)
        engine = two_steps_and_save(cfg, info, torch.bfloat16)
        assert type(engine.optimizer).__name__ == OPTIMIZERS[name], (name, type(engine.optimizer).__name__)
        masters, low = _fp32_masters(engine)
        if info.rank == 0:
            torch.save({"masters": masters, "bf16": low, "optimizer": type(engine.optimizer).__name__},
                       os.path.join(cfg.output_dir, REFERENCE))
        torch.distributed.barrier()
        engine.destroy()
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # several engines ran in this process: skip destructors that can abort at exit


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    rc, log = deepspeed_launch(__file__, str(root), str(config), timeout=300)
    assert rc == 0, log[-4000:]
    return root


def _reference(run_dir):
    ref = torch.load(os.path.join(run_dir, REFERENCE), weights_only=True)
    rounded = [n for n, m in ref["masters"].items() if not torch.equal(m, ref["bf16"][n].float())]
    assert ref["bf16"]["logit_scale"].dtype == torch.bfloat16
    assert len(rounded) > len(ref["masters"]) // 2  # the masters carry what bf16 rounds away
    return ref


@pytest.mark.parametrize("run", list(RUNS))
def test_bf16_checkpoint_exports_the_fp32_masters(bf16_runs, run, tmp_path):
    import vlp
    from vlp.checkpoint import consolidated_state_dict, find_checkpoint
    from vlp.export import export
    from vlp.load import load_model

    run_dir = bf16_runs / run
    ref = _reference(run_dir)
    ckpt = find_checkpoint(str(run_dir))
    files = os.listdir(ckpt.path)
    if run == "zero0":
        assert not [f for f in files if "optim_states" in f]  # the masters live in the model-states file
    else:
        assert sorted(f for f in files if f.endswith("optim_states.pt")) == [
            f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    sd = consolidated_state_dict(ckpt.path)
    for name, master in ref["masters"].items():
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], master), (run, name)
    # the export (format vlp, fp32) and `vlp eval --checkpoint`'s loader hold exactly the masters
    exported = vlp.load_pretrained(export(str(run_dir), "vlp", str(tmp_path / "vlp"), log=lambda m: None).out)
    evaluated = load_model(str(run_dir)).model
    for model in (exported, evaluated):
        state = model.state_dict()
        assert all(torch.equal(state[n], m) for n, m in ref["masters"].items()), run


def _rewrite_model_states(step_dir, change):
    path = os.path.join(step_dir, "mp_rank_00_model_states.pt")
    states = torch.load(path, map_location="cpu", weights_only=True)
    change(states)
    torch.save(states, path)
    return path


def _swap_same_shaped_masters(states):
    """Swap the fp32 masters of two different parameters of one shape (what mislabelling would do)."""
    group = states["optimizer"]["fp32_groups"][-1]
    i, j = next((i, j) for i in range(len(group)) for j in range(i + 1, len(group))
                if group[i].shape == group[j].shape and not torch.equal(group[i], group[j]))
    group[i], group[j] = group[j], group[i]


def test_zero0_bf16_checkpoint_without_recorded_names(bf16_runs, tmp_path):
    """A checkpoint from before vlp recorded the masters' names: they are lined up with the parameter groups
    of the model its config builds, each checked against its bf16 weight; masters that do not fit are
    refused naming the file and what to do, never exported as bf16. Recorded names that do not fit too."""
    import shutil

    from vlp.checkpoint import MASTER_NAMES, CheckpointError, consolidated_state_dict, find_checkpoint

    ref = _reference(bf16_runs / "zero0")
    original = find_checkpoint(str(bf16_runs / "zero0")).path
    step_dir = str(tmp_path / "checkpoints" / "step_0000002")
    shutil.copytree(original, step_dir)
    path = _rewrite_model_states(step_dir, lambda s: s.pop(MASTER_NAMES))
    sd = consolidated_state_dict(step_dir)
    assert all(torch.equal(sd[n], m) for n, m in ref["masters"].items())

    _rewrite_model_states(step_dir, _swap_same_shaped_masters)
    with pytest.raises(CheckpointError, match=f"{path}: its fp32 master weights .* do not line up with the "
                                              "parameter groups of the model built from its config.yaml"):
        consolidated_state_dict(step_dir)

    shutil.copy(os.path.join(original, "mp_rank_00_model_states.pt"), path)

    def swap_names(states):
        first = states[MASTER_NAMES][0]
        first[0], first[1] = first[1], first[0]

    _rewrite_model_states(step_dir, swap_names)
    with pytest.raises(CheckpointError, match=f"{path}: its fp32 master weights .* do not line up with the names "
                                              "recorded .* resume the run for one step"):
        consolidated_state_dict(step_dir)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    rank_main(args[0], args[1])
