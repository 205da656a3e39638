"""benchmarks/siglip_memory.py's own code at a tiny size: two gloo ranks, the gathered and the ring loss
agree and a peak is measured for each, so the benchmark cannot rot."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_gathered_and_ring_points_agree_and_report_memory():
    from siglip_memory import point

    gathered, ring = point(2, 64, False), point(2, 64, True)
    assert abs(gathered["loss"] - ring["loss"]) < 1e-5
    assert gathered["global_batch"] == ring["global_batch"] == 128
    assert gathered["logits_block_mib"] == 2 * ring["logits_block_mib"]
    assert gathered["peak_mib"] >= 0 and ring["peak_mib"] >= 0
