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
