"""Secrets and private URLs never reach a file vlp writes (issue 14, item 4): configs are persisted with
`${oc.env:...}` unresolved and URL credentials removed, in run directories, checkpoints, eval JSON and
exports."""
import os

from vlp.config import load_config, persisted_dict, persisted_yaml

SECRET = "s3cr3t-token-value"


def test_persisted_config_keeps_env_interpolations_and_strips_url_credentials(monkeypatch):
    monkeypatch.setenv("VLP_TEST_TOKEN", SECRET)
    cfg = load_config(None, ["train.wandb_project=${oc.env:VLP_TEST_TOKEN}",
                             "data.eval_shards=https://user:pw@data.example/test-{000..001}.tar::"
                             "https://data.example/more.tar?sig=abc&exp=1"])
    assert cfg.train.wandb_project == SECRET  # the run itself sees the value
    text = persisted_yaml(cfg)
    assert SECRET not in text and "${oc.env:VLP_TEST_TOKEN}" in text
    d = persisted_dict(cfg)
    assert d["data"]["eval_shards"] == "https://data.example/test-{000..001}.tar::https://data.example/more.tar"
    assert "pw" not in text and "sig=" not in text


def test_run_directory_checkpoint_and_export_hold_no_secret(tmp_path, synth_train, monkeypatch):
    from tests.dist.train_entry import write_tiny_config
    from vlp.checkpoint import checkpoint_config, find_checkpoint
    from vlp.export import export
    from vlp.train import train

    monkeypatch.setenv("VLP_TEST_TOKEN", SECRET)
    out = tmp_path / "run"
    cfg = load_config(write_tiny_config(str(tmp_path / "tiny.yaml")),
                      [f"data.train_shards={synth_train}", f"output_dir={out}", "train.steps=2",
                       "train.warmup_steps=0", "train.wandb_project=${oc.env:VLP_TEST_TOKEN}"])
    train(cfg)
    written = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
    assert any(p.endswith("config.yaml") for p in written)
    for path in written:
        with open(path, "rb") as f:
            assert SECRET.encode() not in f.read(), path
    with open(out / "config.yaml") as f:
        assert "${oc.env:VLP_TEST_TOKEN}" in f.read()
    # reading the checkpoint back (eval, export, init_from) never needs the variable, and drops its value
    monkeypatch.delenv("VLP_TEST_TOKEN")
    assert checkpoint_config(find_checkpoint(str(out))).train.wandb_project == ""
    monkeypatch.setenv("VLP_TEST_TOKEN", SECRET)
    res = export(str(out), "vlp", str(tmp_path / "export"), log=lambda m: None)
    for root, _, files in os.walk(res.out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), name
