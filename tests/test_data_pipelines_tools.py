"""`vlp data inspect` and `vlp data tokenizer`, SHARDS specs, and the `vlp data` argument parser."""
import json
import os

import pytest
import sentencepiece as spm
from PIL import Image

from data_pipelines.inspect_shards import inspect_shards
from data_pipelines.shardspec import InputError, expand_shards
from data_pipelines.tokenizer import iter_captions, train_tokenizer
from vlp.cli import build_parser
from vlp.cli import main as vlp_main


def test_shard_specs(synth_train, synth_test):
    d = str(synth_train)
    all4 = [os.path.join(d, f"synth-train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(d) == all4
    assert expand_shards(os.path.join(d, "synth-train-{000001..000002}.tar")) == all4[1:3]
    joined = f"{all4[0]}::{synth_test}"
    assert expand_shards(joined) == [all4[0]] + expand_shards(str(synth_test))
    with pytest.raises(InputError, match="does not exist"):
        expand_shards(os.path.join(d, "synth-train-{000003..000005}.tar"))
    with pytest.raises(InputError, match="no \\*.tar"):
        expand_shards(str(os.path.dirname(d)))


def test_inspect(synth_train, tmp_path):
    png = str(tmp_path / "sheet.png")
    report = inspect_shards(str(synth_train), n=6, out_png=png)
    assert report["samples"] == 64
    assert [s["samples"] for s in report["shards"]] == [16] * 4
    assert report["extensions"] == {"jpg": 64, "json": 64, "txt": 64}
    assert report["keys_sample"][0] == "synth-train-s0-0000000" and len(report["keys_sample"]) == 6
    assert report["duplicate_keys"] == 0 and report["without_caption"] == 0
    cw = report["caption_words"]
    assert 4 <= cw["min"] <= cw["mean"] <= cw["max"] <= 20
    assert report["captions_per_sample"] == {"min": 1, "mean": 1.0, "max": 1}
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_inspect_cli_counts_multi_caption_lines(tmp_path, capsys):
    import io

    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    os.makedirs(tmp_path / "s")
    with wds.TarWriter(str(tmp_path / "s" / "a.tar"), encoder=False) as w:
        w.write({"__key__": "k0", "jpg": buf.getvalue(), "txt": b"one two\nthree four five\n"})
        w.write({"__key__": "k1", "jpg": buf.getvalue()})
        w.write({"__key__": "k0", "txt": b"again"})
    rc = vlp_main(["data", "inspect", str(tmp_path / "s"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["samples"] == 3
    assert report["caption_words"] == {"min": 1, "mean": 2.0, "max": 3}
    assert report["captions_per_sample"]["max"] == 2
    assert report["duplicate_keys"] == 1 and report["without_caption"] == 1 and report["without_image"] == 1
    rc = vlp_main(["data", "inspect", str(tmp_path / "nothing-{0..3}.tar")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_tokenizer(synth_train, tmp_path, model_type):
    out = str(tmp_path / "tok")
    meta = train_tokenizer(str(synth_train), vocab_size=48, out=out, model_type=model_type)
    with open(os.path.join(out, "vlp_tokenizer.json")) as f:
        assert json.load(f) == meta
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 48 and meta["model"] == "spm.model"
    assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
    assert meta["trained_on"]["captions"] == 64
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 48
    caption = next(iter_captions(expand_shards(str(synth_train))))
    ids = sp.encode(caption)
    assert ids and min(ids) > 3 and sp.decode(ids) == caption
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_tokenizer(str(synth_train), vocab_size=48, out=out)


def test_tokenizer_cli_errors(synth_train, tmp_path, capsys):
    rc = vlp_main(["data", "tokenizer", str(synth_train), "--vocab-size", "5000", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "--vocab-size 5000 is too large" in err and "use at most" in err
    assert not os.path.exists(tmp_path / "t" / "spm.model")
    rc = vlp_main(["data", "tokenizer", str(synth_train), "--vocab-size", "10", "--out", str(tmp_path / "t")])
    assert rc == 2 and "use at least" in capsys.readouterr().err


def test_data_parser():
    parser = build_parser()
    args = parser.parse_args(["data", "bench", "shards/", "--workers", "3", "--batch-size", "8", "--samples", "100",
                              "--config", "c.yaml", "--json", "data.image_size=32", "train.seed=1"])
    assert args.func.__name__ == "_bench" and args.workers == 3 and args.batch_size == 8 and args.samples == 100
    assert args.overrides == ["data.image_size=32", "train.seed=1"] and args.json and args.config == "c.yaml"
    for tool in ("convert", "synth", "inspect", "tokenizer", "bench"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["data", tool, "--help"])
        assert e.value.code == 0


def test_synth_cli(tmp_path, capsys):
    rc = vlp_main(["data", "synth", str(tmp_path / "s"), "--n", "10", "--split", "test", "--json",
                   "--samples-per-shard", "4", "--image-size", "32"])
    stats = json.loads(capsys.readouterr().out)
    assert rc == 0 and stats["written"] == 10 and len(stats["shards"]) == 3 and stats["image_size"] == 32
    assert sorted(os.listdir(tmp_path / "s"))[-1] == "synth-test-000002.tar"


def test_bert_vocab_overwrite_replaces_only_its_own_files(synth_train, tmp_path):
    """`vlp data bert-vocab --overwrite` rewrites the tokenizer and config it writes; other files stay."""
    from transformers import BertTokenizer

    from data_pipelines.bert_vocab import write_bert_vocab

    out = tmp_path / "bert"
    first = write_bert_vocab(str(synth_train), str(out))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_bert_vocab(str(synth_train), str(out), max_size=20)
    second = write_bert_vocab(str(synth_train), str(out), max_size=20, overwrite=True)
    assert first["vocab_size"] > 20 and second["vocab_size"] == 20
    assert len(BertTokenizer.from_pretrained(str(out))) == 20 and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # no temp directory left beside it


def test_tools_count_a_cut_shard_and_go_on(synth_train, tmp_path):
    """`vlp data inspect`/`tokenizer`/`bert-vocab` read shards with the training reader: a tar cut
    mid-member ends that shard with a counted skip; the samples before the cut are still read."""
    import shutil

    from data_pipelines.bert_vocab import write_bert_vocab

    cut = tmp_path / "cut"
    shutil.copytree(synth_train, cut)
    tar = sorted(cut.glob("*.tar"))[1]
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2)
    report = inspect_shards(str(cut), n=4)
    assert report["skipped"] == {"truncated_tar": 1} and 48 < report["samples"] < 64
    assert write_bert_vocab(str(cut), str(tmp_path / "bert"))["captions"] == report["samples"] - report["without_caption"]
