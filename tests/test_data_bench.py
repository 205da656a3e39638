"""`vlp data bench` streams the real training loader and reports samples/s as JSON."""
import json

from vlp.cli import main


def test_bench_json_last_line(synth_train, capsys):
    rc = main(["data", "bench", str(synth_train), "--workers", "1", "--batch-size", "8", "--samples", "48",
               "--json", "data.image_size=32", "data.shuffle_buffer=16"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["workers"] == 1 and result["samples"] == 48 and result["image_size"] == 32
    assert result["samples_per_s"] > 0
    assert result["skipped"]["unreadable_image"] == 0 and "truncated_tar" in result["skipped"]
    assert "samples/s" in out[-2]


def test_bench_reports_clips_and_frames_for_a_video_config(tmp_path, capsys):
    from data_pipelines.synth_video import write_synth_video
    from tests.dist.train_entry import write_tiny_config

    write_synth_video(str(tmp_path / "clips"), n=16, seed=0, split="train", samples_per_shard=8, side=32)
    cfg = write_tiny_config(str(tmp_path / "tiny.yaml"))
    rc = main(["data", "bench", str(tmp_path / "clips"), "--config", cfg, "--workers", "1", "--batch-size", "4",
               "--samples", "16", "--json", "model.video.enabled=true", "model.video.max_frames=3", "data.video.frames=3"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["frames_per_clip"] == 3 and result["samples"] == 16
    assert result["clips_per_s"] > 0 and abs(result["frames_per_s"] - 3 * result["clips_per_s"]) < 0.2
    assert "clips/s" in out[-2] and "frames/s" in out[-2]
