"""A 2-process ZeRO-3 checkpoint (gloo, CPU) consolidates to exactly the parameters the ranks held,
and exports from it reproduce the model.

As a script this file is each rank's entry: 2 optimizer steps of a tiny CLIP under ZeRO-3 on fixed
batches (each rank its half), a checkpoint in vlp's layout (`vlp.checkpoint.save`), and the
full parameters gathered with `deepspeed.zero.GatheredParameters` as the reference.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

TINY = """\
model:
  type: clip
  embed_dim: 32
  vision:
    kind: timm
    name: vit_tiny_patch16_224
    kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}
  text:
    kind: open_clip
    kwargs: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 2, mlp_ratio: 2.0}
data:
  image_size: 32
  tokenizer: {kind: open_clip, name: ViT-B-32, context_length: 16}
train:
  steps: 2
  micro_batch_size: 4
  lr: 1.0e-2
  zero_stage: 3
  resume: none
"""
REFERENCE = "gathered_params.safetensors"


def rank_main(out: str, config: str) -> None:
    import deepspeed
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
    from tests.dist.train_entry import two_steps_and_save
    from vlp.config import load_config
    from vlp.dist import setup_distributed

    info = setup_distributed(120)
    cfg = load_config(config, [f"output_dir={out}"])
    engine = two_steps_and_save(cfg, info)
    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        if info.rank == 0:
            save_file({n: p.detach().clone().contiguous() for n, p in named}, os.path.join(out, REFERENCE))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    out = str(root / "run")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, out, str(config)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return out


def test_zero3_checkpoint_consolidates_to_the_gathered_parameters(zero3_run):
    from safetensors.torch import load_file

    from vlp.checkpoint import consolidated_state_dict, find_checkpoint

    ckpt = find_checkpoint(zero3_run)
    assert ckpt.step == 2 and ckpt.state["world_size"] == 2
    assert len([n for n in os.listdir(ckpt.path) if n.endswith("optim_states.pt")]) == 2  # one partition per rank
    ref = load_file(os.path.join(zero3_run, REFERENCE))
    sd = consolidated_state_dict(ckpt.path)
    assert set(ref) <= set(sd)
    for name, value in ref.items():
        assert sd[name].shape == value.shape and torch.equal(sd[name], value), name
    assert ref["logit_scale"].shape == torch.Size([1])


def test_exports_of_a_zero3_run_reproduce_the_gathered_model(zero3_run, tmp_path):
    from safetensors.torch import load_file

    import vlp
    from vlp.export import export

    ref = load_file(os.path.join(zero3_run, REFERENCE))
    res = export(zero3_run, "vlp", str(tmp_path / "vlp"), log=lambda m: None)
    loaded = vlp.load_pretrained(res.out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())
    for fmt in ("hf", "open_clip"):
        res = export(zero3_run, fmt, str(tmp_path / fmt), log=lambda m: None)
        assert res.verified and max(res.verified.values()) < 1e-5  # reloaded by transformers / open_clip


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
