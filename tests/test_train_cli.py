"""`vlp train` on the command line: help text, the launcher command it builds, early config errors."""
import os
import socket

import pytest

from vlp.cli import build_parser, main
from vlp.train.cli import train_command

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_clip.yaml")


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("--config", "--nproc", "--master-port", "KEY=VALUE", "train.resume=auto", "Ctrl-C"):
        assert text in out, text


def test_train_command_runs_the_entry_script_on_n_ranks():
    cmd = train_command("configs/demo_clip.yaml", ["train.steps=5"], 2, master_port=29123)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29123"
    script = next(c for c in cmd if c.endswith("pretrain.py"))
    assert os.path.isfile(script) and script.endswith(os.path.join("launch", "pretrain.py"))
    assert cmd[-3:] == ["--config", "configs/demo_clip.yaml", "train.steps=5"]
    free = train_command("configs/demo_clip.yaml", [], 2)  # default: a free port, not DeepSpeed's fixed 29500
    port = int(free[free.index("--master_port") + 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_bad_config_fails_before_launching(tmp_path, capsys):
    rc = main(["train", "--config", DEMO, "--nproc", "2", "train.zero_stage=7",
               f"output_dir={tmp_path}/never"])
    assert rc == 2
    assert "'train.zero_stage'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_demo_config_is_valid():
    from vlp.config import load_config
    from vlp.train.ds_config import deepspeed_config

    cfg = load_config(DEMO)
    assert cfg.data.train_shards == "runs/demo/data/train" and cfg.output_dir == "runs/demo"
    ds = deepspeed_config(cfg, 2, device_type="cpu", bf16_supported=True)
    assert ds["train_batch_size"] == 128 and ds["gradient_clipping"] == 1.0
