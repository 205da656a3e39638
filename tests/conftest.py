"""Shared fixtures: the built-in synthetic shards, generated once per test session."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory):
    """64 training samples in 4 shards of the synthetic compositional set."""
    from data_pipelines.synth import write_synth

    out = tmp_path_factory.mktemp("synth_train")
    write_synth(str(out), n=64, seed=0, split="train", samples_per_shard=16)
    return out


@pytest.fixture(scope="session")
def synth_test(tmp_path_factory):
    """32 held-out samples with unique captions in 2 shards."""
    from data_pipelines.synth import write_synth

    out = tmp_path_factory.mktemp("synth_test")
    write_synth(str(out), n=32, seed=1, split="test", samples_per_shard=16)
    return out


@pytest.fixture(scope="module")
def own_process_group():
    """For modules that train in-process: train()/deepspeed.initialize set up a world-of-one group
    and env:// variables; undo both after the module. DeepSpeed's destroy also drops its cached
    world group, which torch's alone leaves stale for the next deepspeed.initialize."""
    saved = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        from vlp.dist import release_shm_buffer

        release_shm_buffer()
        deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL): a loopback HTTP server over tmp_path/www for the downloading tests."""
    from tests.loopback import serve_folder

    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root) as url:
        yield root, url
