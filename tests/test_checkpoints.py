"""Real open_clip ViT-B-32 (random init, offline) through the checkpoint loader and the composition."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness.api import HarnessError
from harness.checkpoints import build_clip, clip_task_vectors, load_state_dict, save_state_dict
from harness.composition import Composition, functional_forward

BAD_BLOCK = "transformer.resblocks.3.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def clip():
    model, preprocess, tokenizer = build_clip("ViT-B-32", None)
    return model, preprocess, tokenizer


@pytest.fixture(scope="module")
def finetuned(clip, tmp_path_factory):
    """Two synthetic fine-tunes: base + small noise on the visual params, saved in the two layouts."""
    model = clip[0]
    tmp = tmp_path_factory.mktemp("ckpt")
    gen = torch.Generator().manual_seed(0)
    visual = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    noises, paths = [], []
    for i in range(2):
        noises.append({k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in visual.items()})
    # Task a: a full CLIP state dict (text tower included) as safetensors.
    full = dict(model.state_dict())
    for k, n in noises[0].items():
        full["visual." + k] = visual[k] + n
    paths.append(str(tmp / "a.safetensors"))
    save_state_dict(full, paths[0])
    # Task b: an image-encoder-only dict, torch.save'd and wrapped like a training checkpoint.
    enc = {k: visual[k] + n for k, n in noises[1].items()}
    paths.append(str(tmp / "b.pt"))
    torch.save({"state_dict": enc, "epoch": 3}, paths[1])
    return tmp, noises, paths, enc


def test_build_clip_offline(clip):
    model, preprocess, tokenizer = clip
    assert not model.training and preprocess is not None
    assert tokenizer(["a photo of a cat"]).shape == (1, 77)


@pytest.fixture(scope="module")
def loaded(clip, finetuned):
    """Exactly the public path: build_clip → clip_task_vectors over the two files."""
    return clip_task_vectors(clip[0], finetuned[2])


def test_task_vectors_equal_the_noise(clip, finetuned, loaded):
    _, noises, _, _ = finetuned
    base, tvs = loaded
    assert len(base) == 152 and list(base) == list(clip[0].visual.state_dict())
    assert len(tvs) == 2
    for tv, noise in zip(tvs, noises):
        assert list(tv) == list(base)
        worst = max(float((tv[k] - noise[k]).abs().max()) for k in base)
        assert worst < 1e-6


def test_one_hot_reproduces_finetuned_encoder(clip, finetuned, loaded):
    model = clip[0]
    enc = finetuned[3]
    base, tvs = loaded
    comp = Composition(base, tvs, ["a", "b"], space="per_block")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.func.functional_call(model.visual, enc, (images,))
        got = functional_forward(model.visual, comp.merge(comp.one_hot(1)), images)
        pre = model.visual(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected - pre).abs().max() > 1e-2  # the fine-tune really changed the output


def test_missing_file(clip, tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(HarnessError) as err:
        clip_task_vectors(clip[0], [path])
    assert str(err.value) == f"checkpoint not found: {path}"


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(HarnessError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {path} is not a readable safetensors/torch state dict: ")
    assert "\n" not in msg and len(msg) < len(str(path)) + 250


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(HarnessError, match="holds a list, not a state dict"):
        load_state_dict(path)
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "note": "hi"}, path)
    with pytest.raises(HarnessError, match="entry 'note' is a str, not a tensor"):
        load_state_dict(path)


def test_wrappers_are_unwrapped(tmp_path):
    sd = {"w": torch.arange(3.0)}
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "m.pth")
    got = load_state_dict(tmp_path / "m.pth")
    assert list(got) == ["w"] and torch.equal(got["w"], sd["w"])


def test_shape_mismatch_names_block_and_file(clip, finetuned):
    tmp, _, _, enc = finetuned
    bad = dict(enc)
    bad[BAD_BLOCK] = torch.zeros(768, 768)
    path = str(tmp / "bad.safetensors")
    save_state_dict(bad, path)
    with pytest.raises(HarnessError) as err:
        clip_task_vectors(clip[0], [path])
    assert str(err.value) == (f"checkpoint {path}: block '{BAD_BLOCK}' has shape (768, 768), "
                              "expected (3072, 768)")
    del bad[BAD_BLOCK]
    save_state_dict(bad, path)
    with pytest.raises(HarnessError) as err:
        clip_task_vectors(clip[0], [path])
    assert str(err.value).startswith(f"checkpoint {path}: block '{BAD_BLOCK}' is missing")


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(clip, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": evil}, path)
    assert not marker.exists()
    expected = (f"checkpoint {path} was refused: it is a pickle that would run code (posix.system); "
                "nothing from it was run. Save it with safetensors or as a plain state dict")
    for load in (lambda: load_state_dict(path), lambda: clip_task_vectors(clip[0], [str(path)]),
                 lambda: build_clip("ViT-B-32", str(path))):
        with pytest.raises(HarnessError) as err:
            load()
        assert str(err.value) == expected
    assert not marker.exists()


def test_build_clip_errors(tmp_path):
    with pytest.raises(HarnessError) as err:
        build_clip("ViT-B-999", None)
    msg = str(err.value)
    assert "unknown open_clip model 'ViT-B-999'" in msg and "ViT-B-32" in msg and "\n" not in msg
    with pytest.raises(HarnessError, match="neither a file nor a known tag"):
        build_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(HarnessError, match="checkpoint not found"):
        build_clip("ViT-B-32", str(tmp_path / "zs.safetensors"))
    with pytest.raises(HarnessError, match="model folder not found"):
        build_clip("ViT-B-32", f"local-dir:{tmp_path / 'missing'}")


def test_build_clip_from_local_file(finetuned):
    """A full CLIP checkpoint as ``pretrained`` loads (safely validated first) into every block."""
    _, noises, paths, _ = finetuned
    model, _, _ = build_clip("ViT-B-32", paths[0])
    saved = load_state_dict(paths[0])
    got = model.state_dict()
    assert set(got) == set(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
