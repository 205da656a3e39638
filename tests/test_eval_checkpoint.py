"""Evaluating training runs: real `vlp.train` checkpoints (ZeRO 0 and 3) loaded through DeepSpeed's
consolidation, the CLI on a run directory, and the in-training hook on a ZeRO-3 engine."""
import json
import os

import pytest
import torch

TINY = """\
model:
  type: clip
  embed_dim: 32
  vision:
    kind: timm
    name: vit_tiny_patch16_224
    kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2.0}
  text:
    kind: open_clip
    kwargs: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}
data:
  workers: 0
  shuffle_buffer: 0
  image_size: 32
  tokenizer: {kind: open_clip, name: ViT-B-32, context_length: 16}
train:
  steps: 2
  micro_batch_size: 8
  warmup_steps: 0
  log_every: 1
  tensorboard: false
  resume: none
"""


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """train() and deepspeed.initialize run in this process: see conftest.own_process_group."""


@pytest.fixture(scope="module")
def runs(synth_train, synth_test, tmp_path_factory):
    """Two 2-step runs of the same tiny CLIP, one with ZeRO-0 and one with ZeRO-3 checkpoints."""
    from vlp.config import load_config
    from vlp.train import train

    root = tmp_path_factory.mktemp("runs")
    (root / "tiny.yaml").write_text(TINY)
    out = {}
    for stage in (0, 3):
        cfg = load_config(str(root / "tiny.yaml"), [f"data.train_shards={synth_train}", f"output_dir={root}/z{stage}",
                                                     f"data.eval_shards={synth_test}", f"train.zero_stage={stage}"])
        out[stage] = (str(root / f"z{stage}"), train(cfg).checkpoint)
    return out


def test_runs_of_any_zero_stage_load_to_the_same_model(runs, synth_test, tmp_path):
    from vlp.cli import main
    from vlp.eval.evaluate import evaluate_retrieval
    from vlp.load import detect_format, load_model

    (run0, ckpt0), (run3, ckpt3) = runs[0], runs[3]
    assert os.path.basename(ckpt3) == "step_0000002"
    assert detect_format(run0) == detect_format(ckpt3) == "vlp-checkpoint"
    a, b = load_model(run0), load_model(ckpt3)  # a run dir (via `latest`), and one checkpoint dir
    assert a.info["path"] == ckpt0 and b.info["path"] == ckpt3 and a.info["step"] == 2
    assert a.image_cfg["size"] == 32 and a.info["config"].model.embed_dim == 32
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # ZeRO-0 and ZeRO-3 train the same weights; fp32 consolidation restores them
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=1e-4, rtol=1e-4, msg=k)
    kw = dict(batch_size=16, progress=False)
    ra = evaluate_retrieval(a.model, a.tokenizer, a.preprocess, str(synth_test), **kw)
    rb = evaluate_retrieval(b.model, b.tokenizer, b.preprocess, str(synth_test), **kw)
    assert ra["metrics"] == rb["metrics"]

    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", "--checkpoint", run3, "--data", str(synth_test), "--out", str(out),
                 "--workers", "0"]) == 0
    res = json.loads(out.read_text())
    assert res["metrics"] == rb["metrics"] and res["model"]["format"] == "vlp-checkpoint"
    assert res["config"]["train"]["zero_stage"] == 3 and res["model"]["image_cfg"]["size"] == 32


def test_hook_on_a_zero3_engine_equals_the_plain_model(runs):
    import deepspeed

    from vlp.eval import run_retrieval_eval
    from vlp.eval.evaluate import evaluate_retrieval
    from vlp.load import load_model

    loaded = load_model(runs[0][0])
    cfg = loaded.info["config"]
    ref = run_retrieval_eval(loaded.model, cfg, 0, 1)
    assert ref["n_images"] == 32 and ref["n_texts"] == 32 and ref["n_skipped"] == 0
    assert set(ref) >= {"i2t_r1", "t2i_r10", "mean_recall", "i2t_median_rank"}
    engine, *_ = deepspeed.initialize(model=loaded.model, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    engine.module.train()
    assert run_retrieval_eval(engine.module, cfg, 0, 1) == ref
    assert engine.module.training and next(engine.module.parameters()).numel() == 0  # still partitioned
    with pytest.raises(ValueError, match="partitioned by ZeRO-3"):
        evaluate_retrieval(engine.module, loaded.tokenizer, loaded.preprocess, cfg.data.eval_shards, progress=False)


def test_incomplete_runs_are_refused(runs, tmp_path):
    from vlp.load import load_model

    (tmp_path / "run" / "checkpoints" / "step_0000005").mkdir(parents=True)  # no vlp_state.json: incomplete
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000005")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(str(tmp_path / "run"))


def test_vlp_export_evaluates_like_its_checkpoint(runs, synth_test, tmp_path):
    from vlp.eval.evaluate import evaluate_retrieval
    from vlp.load import detect_format, load_model
    from vlp.export.vlp_format import write_vlp

    run = load_model(runs[0][0])
    out = str(tmp_path / "export")
    os.makedirs(out)
    write_vlp(run.model, run.info["config"], run.image_cfg, out, "fp32", "5GB", {})
    assert detect_format(out) == "vlp-export"
    exp = load_model(out)
    assert exp.image_cfg == run.image_cfg and exp.info["config"].model.embed_dim == 32
    kw = dict(batch_size=16, progress=False)
    assert (evaluate_retrieval(exp.model, exp.tokenizer, exp.preprocess, str(synth_test), **kw)["metrics"]
            == evaluate_retrieval(run.model, run.tokenizer, run.preprocess, str(synth_test), **kw)["metrics"])
