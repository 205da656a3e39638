"""Two CPU ranks under DeepSpeed's launcher (the training test entry, real `vlp.train`): a ViT with a
frozen LLaMA block and a ViT with EViT each train under ZeRO-2 and ZeRO-3. The frozen layer stays
bit-identical, outside the optimizer, and in the checkpoint; EViT's warm-up counter is checkpointed."""
import glob
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIST = os.path.join(HERE, "dist")
from tests.dist.train_entry import TINY_YAML, deepspeed_launch, write_fixed_batches

pytestmark = pytest.mark.slow
STEPS = 4


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    return str(out), {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}


def test_frozen_llm_and_evit_train_on_two_ranks_zero2_and_zero3(llama_dir, synth_train, tmp_path):
    from vlp.config import load_config
    from vlp.checkpoint import consolidated_state_dict
    from vlp.models import build_model
    from vlp.train.loop import _seed_all

    llm, layer = llama_dir
    cfg = OmegaConf.merge(OmegaConf.create(TINY_YAML), {"model": {"vision": {"evit": {"blocks": [0, 1],
                                                                                       "shrink_steps": 2}}}})
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(OmegaConf.to_yaml(cfg))
    common = [f"data.train_shards={synth_train}", f"train.steps={STEPS}", "train.warmup_steps=1",
              "train.micro_batch_size=8", "train.save_every=0"]
    batches = str(tmp_path / "batches.pt")
    write_fixed_batches(load_config(str(yaml), common), batches, n=STEPS, global_batch=16)

    with_llm, with_evit = f"model.vision.frozen_llm.name={llm}", "model.vision.evit.keep_rate=0.7"
    runs = " ".join(f"{name}{z}:train.zero_stage={z},{opt}" for name, opt in (("llm", with_llm), ("evit", with_evit))
                    for z in (2, 3))
    rc, log = deepspeed_launch(os.path.join(DIST, "train_entry.py"), "--config", yaml, "--fixed", batches,
                               "--runs", runs, *common, f"output_dir={tmp_path}/two")
    assert rc == 0, log[-4000:]

    losses = {name: _metrics(f"{tmp_path}/two/{name}") for name in ("llm2", "llm3", "evit2", "evit3")}
    for name, got in losses.items():
        assert sorted(got) == list(range(1, STEPS + 1)) and all(map(torch.isfinite, torch.tensor(list(got.values())))), name
    for a, b in (("llm2", "llm3"), ("evit2", "evit3")):  # same global batches and init: ZeRO-3 agrees with ZeRO-2
        assert max(abs(losses[a][s] - losses[b][s]) / abs(losses[a][s]) for s in losses[a]) < 1e-4, (a, b)

    _seed_all(0)  # the trainer's initial weights
    init = build_model(load_config(str(yaml), common + [with_llm]).model).state_dict()
    frozen = [k for k in init if k.startswith("vision.blocks.2.layer.")]
    assert len(frozen) == len(layer)
    for run in ("llm2", "llm3"):
        step_dir = f"{tmp_path}/two/{run}/checkpoints/step_{STEPS:07d}"
        states_file = sorted(glob.glob(f"{step_dir}/*mp_rank_00_model_states.pt"))[0]  # ZeRO-3: one per rank
        states = torch.load(states_file, map_location="cpu", weights_only=False)
        in_optimizer = {n for group in states["param_shapes"] for n in group}
        assert "vision.blocks.2.proj_in.weight" in in_optimizer
        assert not {n for n in in_optimizer if ".blocks.2.layer." in n}, run  # no optimizer state for the LLM layer
        assert set(frozen) <= set(states["buffer_names"])
        sd = consolidated_state_dict(step_dir)
        for k in frozen:
            assert torch.equal(sd[k], layer[k[len("vision.blocks.2.layer."):]]), (run, k)  # bit-identical
        assert not torch.equal(sd["vision.blocks.2.proj_in.weight"], init["vision.blocks.2.proj_in.weight"])
    for run in ("evit2", "evit3"):
        sd = consolidated_state_dict(f"{tmp_path}/two/{run}/checkpoints/step_{STEPS:07d}")
        assert int(sd["vision.blocks.0.evit_step"]) == STEPS and int(sd["vision.blocks.1.evit_step"]) == STEPS
