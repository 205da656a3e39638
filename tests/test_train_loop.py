"""The training loop in this process (a world of one): learning, logs, checkpoints, exact resume
after SIGINT, NaN detection, and config errors raised before any work."""
import json
import os
import signal

import pytest
import torch

from tests.dist.train_entry import Fault, NaNAt, fixed, write_fixed_batches, write_tiny_config

from vlp.config import load_config  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """train() and deepspeed.initialize run in this process: see conftest.own_process_group."""


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


def _cfg(tiny_yaml, data, out, *overrides):
    return load_config(tiny_yaml, [f"data.train_shards={data}", f"output_dir={out}", *overrides])


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


_RECALLS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def _recalls(checkpoint, cfg, shards):
    """R@1/5/10 both ways of a ZeRO-0 checkpoint's weights on `shards` (one caption per image), computed
    independently of vlp.eval: the tars read with tarfile, CLIP's eval preprocessing (shorter side resized,
    center crop, normalised), ranks from the cosine similarities of the model's own embeddings."""
    import io
    import tarfile

    import torch
    from PIL import Image
    from torchvision import transforms as T

    from vlp.data import build_tokenizer
    from vlp.models import build_model

    model = build_model(cfg.model)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(states["module"])
    model.eval()
    assert not list(cfg.data.mean) and not list(cfg.data.std)  # the model's own normalisation applies
    size, icfg = int(cfg.data.image_size), model.image_cfg
    preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                            T.ToTensor(), T.Normalize(list(icfg["mean"]), list(icfg["std"]))])
    images, captions = [], []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            images.append(preprocess(Image.open(io.BytesIO(files[name])).convert("RGB")))
            captions.append(files[name[:-4] + ".txt"].decode().strip())
    with torch.no_grad():
        text_emb = model.encode_text(*build_tokenizer(cfg.data.tokenizer)(captions))
        sim = model.encode_image(torch.stack(images)) @ text_emb.T
    correct = sim.diagonal()
    ranks = {"i2t": (sim > correct[:, None]).sum(1), "t2i": (sim > correct[None, :]).sum(0)}  # 0 = first
    return {key: (ranks[key[:3]] < int(key[5:])).double().mean().item() for key in _RECALLS}


def _wrap(cls, *args):
    from vlp.train.loop import default_loader

    return lambda c, m, r, w: cls(default_loader(c, m, r, w), *args)


def test_loss_decreases_and_run_directory_is_complete(tiny_yaml, synth_train, synth_test, tmp_path):
    from vlp.train import train

    out = tmp_path / "run"
    cfg = _cfg(tiny_yaml, synth_train, out, "train.steps=30", "train.save_every=10", "train.keep_last=2",
               "train.tensorboard=true", "train.curves=true", f"data.eval_shards={synth_test}", "eval.every=20")
    result = train(cfg)
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, 31))
    losses = [r["loss"] for r in recs]
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses
    for key in ("loss", "contrastive_loss", "lr", "samples_per_s", "tokens_per_s", "flops_per_s", "mfu",
                "samples_seen", "data/skipped/unreadable_image"):
        assert key in recs[-1], key
    assert recs[-1]["samples_seen"] == 30 * 32
    assert 0 < recs[-1]["mfu"] < 1.0 and recs[-1]["tokens_per_s"] > 0
    assert (out / "curves.png").stat().st_size > 10_000  # drawn at the end (tests/test_curves.py checks it)
    assert recs[0]["lr"] == pytest.approx(5e-4 / 3)  # first warm-up step
    evals = {r["step"]: r for r in recs if "eval/mean_recall" in r}
    assert sorted(evals) == [20, 30] and evals[30]["eval/n_images"] == 32  # every 20 steps and at the end
    assert evals[30]["eval/n_texts"] == 32
    # the logged retrieval is that of the step-30 weights, recomputed here without vlp.eval
    logged = {k: evals[30][f"eval/{k}"] for k in _RECALLS}
    assert logged == _recalls(out / "checkpoints" / "step_0000030", cfg, synth_test), logged
    assert evals[30]["eval/mean_recall"] == pytest.approx(sum(logged.values()) / 6)
    # checkpoints: step 10 pruned (keep_last=2), 20 and 30 complete, `latest` names 30
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_0000020", "step_0000030"]
    assert (ckpts / "latest").read_text() == "step_0000030"
    assert result.checkpoint == str(ckpts / "step_0000030")
    state = json.loads((ckpts / "step_0000030" / "vlp_state.json").read_text())
    assert state["step"] == 30 and state["samples_seen"] == 960 and state["world_size"] == 1
    assert state["loader"][0]["epoch"] >= 1
    assert (ckpts / "step_0000030" / "vlp_rank0.pt").is_file()
    assert "micro_batch_size: 32" in (ckpts / "step_0000030" / "config.yaml").read_text()
    assert "micro_batch_size: 32" in (out / "config.yaml").read_text()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    # a rerun with resume=auto finds the run finished and does nothing
    again = train(cfg)
    assert again.step == 30 and len(_records(out)) == 30


def test_sigint_saves_then_resume_is_exact(tiny_yaml, synth_train, tmp_path):
    """Ctrl-C mid-epoch -> checkpoint at the next step boundary; resuming reproduces every later loss
    exactly (fp32 CPU), patch dropout's randomness included."""
    from vlp.train import train

    common = ["train.steps=9", "train.save_every=4", "train.micro_batch_size=16", "model.patch_dropout=0.25"]
    ref = tmp_path / "ref"
    train(_cfg(tiny_yaml, synth_train, ref, *common))

    out = tmp_path / "cut"
    cfg = _cfg(tiny_yaml, synth_train, out, *common)
    stopped = train(cfg, _wrap(Fault, signal.SIGINT, 7))  # signal while fetching step 7's batch
    assert stopped.stopped_by == signal.SIGINT and stopped.step == 7
    assert (out / "checkpoints" / "latest").read_text() == "step_0000007"
    state = json.loads((out / "checkpoints" / "step_0000007" / "vlp_state.json").read_text())
    assert state["step"] == 7 and state["loader"][0]["batches"] == 7 % 4  # 4 batches of 16 per epoch
    resumed = train(cfg)
    assert resumed.step == 9 and resumed.stopped_by == 0
    assert [r["step"] for r in _records(out)] == list(range(1, 10))
    assert [r["loss"] for r in _records(out)] == [r["loss"] for r in _records(ref)]


def test_grad_cache_scores_the_whole_accumulated_batch(tiny_yaml, synth_train, tmp_path):
    """2 micro-batches of 16 with GradCache train like one batch of 32; plain accumulation does not
    (its negatives are per micro-batch)."""
    from vlp.train import train

    common = ["train.steps=5", "train.warmup_steps=1", "train.grad_clip=1.0"]
    batches = str(tmp_path / "batches.pt")
    write_fixed_batches(_cfg(tiny_yaml, synth_train, tmp_path / "x", *common), batches, n=5, global_batch=32)

    def losses(name, *extra):
        train(_cfg(tiny_yaml, synth_train, tmp_path / name, *common, *extra), fixed(batches))
        return [r["loss"] for r in _records(tmp_path / name)]

    big = losses("big", "train.micro_batch_size=32")
    cached = losses("cached", "train.micro_batch_size=16", "train.grad_accum=2", "train.grad_cache=true")
    plain = losses("plain", "train.micro_batch_size=16", "train.grad_accum=2")
    assert cached == pytest.approx(big, rel=1e-5)
    assert plain[0] < big[0] - 0.3  # 16-way instead of 32-way softmax


def test_nonfinite_loss_stops_with_step_and_keys(tiny_yaml, synth_train, tmp_path):
    from vlp.train.loop import NonFiniteLossError, train

    out = tmp_path / "nan"
    cfg = _cfg(tiny_yaml, synth_train, out, "train.steps=10", "train.save_every=2")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3\b.*'synth-train-"):
        train(cfg, _wrap(NaNAt, 3))
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"  # nothing saved after the NaN
    assert [r["step"] for r in _records(out)] == [1, 2]


def test_bad_config_fails_before_any_work(tiny_yaml, synth_train, tmp_path, capsys):
    from vlp.train.cli import pretrain_main

    out = tmp_path / "never"
    assert pretrain_main(["--config", tiny_yaml, f"data.train_shards={synth_train}", f"output_dir={out}",
                          "train.zero_stage=5"]) == 2
    assert "'train.zero_stage'" in capsys.readouterr().err
    assert pretrain_main(["--config", tiny_yaml, f"data.train_shards={tmp_path}/missing", f"output_dir={out}"]) == 2
    assert "'data.train_shards'" in capsys.readouterr().err
    assert pretrain_main(["--config", tiny_yaml, f"data.train_shards={synth_train}", f"output_dir={out}",
                          "train.lr_typo=1"]) == 2
    assert "nearest valid key: 'train.lr'" in capsys.readouterr().err
    assert not out.exists()


def test_resume_path_must_be_a_complete_checkpoint(tiny_yaml, synth_train, tmp_path):
    from vlp.checkpoint import CheckpointError, find_resume

    (tmp_path / "half" / "step_0000004").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete vlp checkpoint"):
        find_resume(str(tmp_path), str(tmp_path / "half" / "step_0000004"))
    assert find_resume(str(tmp_path), "auto") is None
    assert find_resume(str(tmp_path), "none") is None


def test_a_run_never_prunes_or_mixes_with_another_runs_checkpoints(tiny_yaml, synth_train, tmp_path, capsys):
    """A fresh run in a directory holding another run's checkpoints, or a resume from an older checkpoint
    of a directory with later ones, is refused before any work: before, the new run's own saves moved
    `latest` back and `prune` deleted a checkpoint, and `resume=auto`/export later took the other run's."""
    from vlp.checkpoint import CheckpointError
    from vlp.train import train
    from vlp.train.cli import pretrain_main

    out = tmp_path / "run"
    common = ["train.steps=4", "train.save_every=2", "train.micro_batch_size=16", "train.keep_last=1"]
    train(_cfg(tiny_yaml, synth_train, out, *common))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert before == ["latest", "step_0000004"]
    # vlp's state file and DeepSpeed's stage-0 model file hold nothing torch.load(weights_only=True) refuses
    for name in ("vlp_rank0.pt", "mp_rank_00_model_states.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out / "checkpoints" / before[1] / name)) == []
    with pytest.raises(CheckpointError, match="already holds checkpoints of another run.*step_0000004"):
        train(_cfg(tiny_yaml, synth_train, out, *common, "train.steps=2", "train.resume=none"))
    # the CLI refuses the same with exit 2 and the message, before starting any rank
    assert pretrain_main(["--config", tiny_yaml, f"data.train_shards={synth_train}", f"output_dir={out}",
                          "train.resume=none", *common]) == 2
    assert "train.resume=auto" in capsys.readouterr().err
    # resuming an older checkpoint into the same directory would prune the later one
    train(_cfg(tiny_yaml, synth_train, tmp_path / "other", *common, "train.keep_last=0"))
    older = tmp_path / "other" / "checkpoints" / "step_0000002"
    with pytest.raises(CheckpointError, match="holds later checkpoints"):
        train(_cfg(tiny_yaml, synth_train, tmp_path / "other", *common, f"train.resume={older}"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (tmp_path / "other" / "checkpoints" / "latest").read_text() == "step_0000004"
    # into a new directory it is fine, and resume=auto continues the run itself
    branch = train(_cfg(tiny_yaml, synth_train, tmp_path / "branch", *common, f"train.resume={older}"))
    assert branch.step == 4
    assert train(_cfg(tiny_yaml, synth_train, out, *common, "train.steps=6")).step == 6


def test_a_second_job_on_the_same_output_dir_is_refused(tiny_yaml, synth_train, tmp_path, capsys):
    """Rank 0 holds an flock on OUTPUT_DIR/.vlp_train.lock for the whole run: another job there is refused
    before it writes anything (not interleaved), and the lock goes with the holder."""
    from vlp.checkpoint import CheckpointError, RunLock
    from vlp.train import train
    from vlp.train.cli import pretrain_main

    out = tmp_path / "run"
    common = ["train.steps=2", "train.micro_batch_size=16"]
    out.mkdir()
    (out / "config.yaml").write_text("the running job's\n")
    other = RunLock(str(out))
    assert other.acquire()  # a job in progress
    with pytest.raises(CheckpointError, match=f"output_dir {out} is in use by another training job"):
        train(_cfg(tiny_yaml, synth_train, out, *common))
    assert pretrain_main(["--config", tiny_yaml, f"data.train_shards={synth_train}", f"output_dir={out}", *common]) == 2
    assert "in use by another training job" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "the running job's\n" and not (out / "checkpoints").exists()
    other.release()
    assert train(_cfg(tiny_yaml, synth_train, out, *common)).step == 2
    assert RunLock(str(out)).acquire()  # released when the run ended


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tiny_yaml, synth_train, tmp_path, caplog):
    """resume=auto with a torn newest checkpoint (killed mid-copy, disk error): it is set aside, never
    deleted, the previous complete one is loaded with a warning, and the run continues exactly."""
    from vlp.train import train

    common = ["train.steps=6", "train.save_every=2", "train.micro_batch_size=16", "train.keep_last=0"]
    ref = tmp_path / "ref"
    train(_cfg(tiny_yaml, synth_train, ref, *common))
    out = tmp_path / "run"
    train(_cfg(tiny_yaml, synth_train, out, *common[1:], "train.steps=4"))
    mine = out / "checkpoints" / "step_0000004" / "vlp_rank0.pt"
    mine.write_bytes(mine.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="vlp.checkpoint"):
        resumed = train(_cfg(tiny_yaml, synth_train, out, *common))
    assert "step_0000004 cannot be read" in caplog.text and resumed.step == 6
    assert (out / "checkpoints" / "step_0000004.unreadable" / "vlp_rank0.pt").exists()
    assert [r["loss"] for r in _records(out) if r["step"] > 2] == [r["loss"] for r in _records(ref) if r["step"] > 2]


def test_mfu_above_100_percent_warns_naming_the_likely_cause(tiny_yaml, synth_train, tmp_path, capfd):
    from vlp.train import train

    train(_cfg(tiny_yaml, synth_train, tmp_path / "run", "train.steps=2", "train.log_every=1", "train.peak_flops=1e6"))
    err = capfd.readouterr().err
    assert "vlp train: MFU against 0.001 GFLOP/s: train.peak_flops=1e+06 FLOP/s per device x 1" in err, err[-2000:]
    assert "is above 100%" in err and "train.peak_flops set too low" in err


def test_log_keys_writes_each_steps_sample_keys(tiny_yaml, synth_train, tmp_path):
    from vlp.train import train

    out = tmp_path / "run"
    train(_cfg(tiny_yaml, synth_train, out, "train.steps=2", "train.log_keys=true"))
    with open(out / "keys" / "rank0.jsonl") as f:
        recs = [json.loads(line) for line in f]
    mb = load_config(tiny_yaml).train.micro_batch_size
    assert [r["step"] for r in recs] == [1, 2] and all(len(r["keys"]) == mb for r in recs)
    assert len({k for r in recs for k in r["keys"]}) == 2 * mb  # no sample twice within the epoch
