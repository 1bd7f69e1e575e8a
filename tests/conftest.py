"""Shared fixtures. Heavy things (zoos, Ray) are built once per test session."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests and Ray workers share the machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A zoo cache for the whole session (small zoos are built into it on first use)."""
    path = os.environ.get("ATLAS_HARNESS_TEST_CACHE")
    if path:
        return path
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The workers of one `pytest -n N` run share one cache, so each zoo is built once: the
        # cache's build lock makes a second worker wait for the first one's build, then load it.
        shared = tmp_path_factory.getbasetemp().parent / "zoo-cache"
        shared.mkdir(exist_ok=True)
        return str(shared)
    return str(tmp_path_factory.mktemp("zoo-cache"))


# A tiny open_clip architecture (32 px, one layer per tower) for tests of users' model files.
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """``(model, folder)``: a seeded tiny open_clip CLIP and its ``local-dir:`` folder
    (``open_clip_config.json`` + ``open_clip_model.safetensors``), as a user's pre-trained model."""
    import json
    import open_clip
    from harness.checkpoints import save_state_dict
    folder = tmp_path_factory.mktemp("tiny_open_clip") / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    save_state_dict(dict(model.state_dict()), folder / "open_clip_model.safetensors")
    return model, folder
