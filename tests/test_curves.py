"""Training curves: `curves.png` from metrics.jsonl (and eval JSONs in the run directory), and
`vlp report RUN [RUN_B]` redrawing one run or overlaying two."""
import json
import os
import subprocess
import sys

from PIL import Image

from vlp.plots import draw_curves, read_evals, read_metrics
from vlp.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(path, steps, itm=False, lr=1e-3, skipped_at=None):
    """A run directory whose metrics.jsonl is written by the trainer's own MetricsWriter."""
    os.makedirs(path, exist_ok=True)
    w = MetricsWriter(str(path), 0, 0, tensorboard=False, wandb_cfg=None)
    for s in range(10, steps + 1, 10):
        rec = {"step": s, "loss": 5.0 / s ** 0.3, "contrastive_loss": 4.0 / s ** 0.3, "lr": lr * min(1, s / 50),
               "samples_per_s": 100.0 + s % 7, "mfu": (100.0 + s % 7) * 3e-3, "samples_seen": s * 64,
               "data/skipped/unreadable_image": float(skipped_at is not None and s >= skipped_at)}
        if itm:
            rec.update(itm_loss=0.63 - s / 5000, itm_acc=0.667 + s / 3000, itm_pos_prob=0.33 + s / 2000,
                       itm_neg_prob=0.33 - s / 4000)
        if s % 100 == 0:
            rec.update({"eval/mean_recall": s / 400, "eval/i2t_r1": s / 500, "eval/t2i_r1": s / 600})
        w.log(rec)
    w.close()


def test_curves_show_every_panel_and_checkpoint_evals(tmp_path):
    run = tmp_path / "albef_run"
    _fake_run(run, 300, itm=True, skipped_at=150)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 310, "loss": 1.')  # a run killed mid-write: the torn line is skipped
    for step, mr in ((100, 0.4), (300, 0.7)):
        (run / f"eval_{step:07d}.json").write_text(json.dumps({
            "task": "retrieval", "model": {"step": step}, "metrics": {"mean_recall": mr},
            "reranked": {"mean_recall": mr + 0.05}, "reranked_itc": {"mean_recall": mr + 0.07},
            "itm": {"balanced_acc": 0.6}}))
    (run / "notes.json").write_text("{}")  # not an eval result: ignored
    records = read_metrics(str(run))
    assert [r["step"] for r in records] == list(range(10, 301, 10))
    evals = read_evals(str(run))
    assert [s for s, _ in evals] == [100, 300]

    fig = draw_curves([("albef_run", records)], str(tmp_path / "c.png"), evals=[evals])
    titles = [ax.get_title() for ax in fig.axes]
    for t in ("loss (total and per objective)", "learning rate", "throughput", "held-out retrieval and ITM",
              "ITM head (training pairs)", "skipped samples (cumulative, per reason)"):
        assert t in titles, titles
    by_title = {ax.get_title(): ax for ax in fig.axes}
    labels = lambda t: [ln.get_label() for ln in by_title[t].get_lines() if not ln.get_label().startswith("_")]  # noqa
    assert {"total loss", "contrastive_loss", "itm_loss"} <= set(labels("loss (total and per objective)"))
    assert {"mean recall", "ITM re-ranked mean recall", "ITM + ITC re-ranked", "held-out ITM accuracy"} \
        <= set(labels("held-out retrieval and ITM"))
    assert {"ITM accuracy", "P(match) positives", "P(match) negatives"} <= set(labels("ITM head (training pairs)"))
    assert labels("skipped samples (cumulative, per reason)") == ["unreadable_image"]
    assert [c.get_ylabel() for c in by_title["throughput"].child_axes] == ["MFU (%)"]  # a second scale of samples/s
    img = Image.open(tmp_path / "c.png")
    assert img.size == (1500, 840)


def test_vlp_report_redraws_one_run_and_overlays_two(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _fake_run(a, 200)
    _fake_run(b, 100, lr=5e-4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "vlp.cli", "report", str(a)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert "run_a: 20 logged steps, last step 200" in one.stdout and (a / "curves.png").is_file()
    two = subprocess.run([sys.executable, "-m", "vlp.cli", "report", str(a), str(b), "--out", str(tmp_path / "ab.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    assert "run_b: 10 logged steps" in two.stdout and Image.open(tmp_path / "ab.png").size == (1500, 840)
    fig = draw_curves([("run_a", read_metrics(str(a))), ("run_b", read_metrics(str(b)))], str(tmp_path / "x.png"))
    lr_ax = next(ax for ax in fig.axes if ax.get_title() == "learning rate")
    styles = {ln.get_label(): ln.get_linestyle() for ln in lr_ax.get_lines()}
    assert styles == {"learning rate (run_a)": "-", "learning rate (run_b)": "--"}
    bad = subprocess.run([sys.executable, "-m", "vlp.cli", "report", str(tmp_path / "nothing")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nothing: no metrics.jsonl" in bad.stderr
