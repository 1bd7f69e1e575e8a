"""Your own open_clip model and fine-tuned checkpoints, through the command line a user types.

A tiny open_clip architecture saved as an open_clip ``local-dir:`` folder plays the user's
pre-trained model; two fine-tunes are synthetic (pre-trained weights plus seeded noise), one as
safetensors and one as a torch state dict; one data set is an image folder under ``--data-root``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.checkpoints import save_state_dict

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
BLOCK = "transformer.resblocks.0.mlp.c_fc.weight"


def harness(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """``local-dir:`` model folder, two checkpoints and an image-folder data set on disk."""
    import open_clip
    from PIL import Image
    tmp = tmp_path_factory.mktemp("user")
    model_dir = tmp / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": ARCH, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**ARCH)
    state = {k: v for k, v in model.state_dict().items()}
    save_state_dict(state, model_dir / "open_clip_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    visual = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    ft = tmp / "ft"
    ft.mkdir()
    tuned = []
    for i in range(2):
        tuned.append({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in visual.items()})
    save_state_dict({"visual." + k: v for k, v in tuned[0].items()}, ft / "skdigits.safetensors")
    torch.save({"state_dict": tuned[1]}, ft / "shapes.pt")
    # An image-folder data set: bright squares vs dark squares, 6 images per class per split.
    rng = np.random.default_rng(0)
    data = tmp / "data" / "shapes"
    for split in ("train", "val", "test"):
        for label, level in (("bright", 200), ("dark", 40)):
            folder = data / split / label
            folder.mkdir(parents=True)
            for j in range(6):
                img = np.clip(level + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{j}.png")
    return {"tmp": tmp, "model": f"local-dir:{model_dir}", "ft": ft, "data": tmp / "data", "tuned": tuned}


def _run(user, *extra, results):
    return harness("run", "--task", "addition", "--searcher", "nevergrad", "--budget", "6", "--quiet",
                   "-t", f"pretrained={user['model']}", "--data-root", str(user["data"]),
                   "-t", "source_options=max_n=300", "--results-dir", str(results), *extra)


def test_own_checkpoints_run_end_to_end(user, tmp_path):
    ckpts = f"skdigits={user['ft'] / 'skdigits.safetensors'},{user['ft'] / 'shapes.pt'}"
    r = _run(user, "-t", f"checkpoints={ckpts}", results=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads(next(tmp_path.glob("runs/*/record.json")).read_text())
    assert rec["status"] == "complete" and rec["evaluations"] == 6
    assert rec["task_vectors"] == ["skdigits", "shapes"]
    assert set(rec["final"]) >= {"acc/skdigits", "acc/shapes", "normalized_acc"}
    assert rec["references"]["zero-shot"]["acc/shapes"] >= 0.0
    # A folder of checkpoints names the data sets by file stem: the same run.
    r2 = _run(user, "-t", f"checkpoints={user['ft']}", results=tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    rec2 = json.loads(next((tmp_path / "b").glob("runs/*/record.json")).read_text())
    assert sorted(rec2["task_vectors"]) == ["shapes", "skdigits"]


def _one_line_error(r):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_wrong_checkpoint_path_is_one_line(user, tmp_path):
    missing = user["ft"] / "nope.safetensors"
    line = _one_line_error(_run(user, "-t", f"checkpoints=x={missing}", results=tmp_path))
    assert line == f"error: checkpoint not found: {missing} (task option checkpoints)"
    assert not (tmp_path / "runs").exists()  # refused before anything was recorded


def test_corrupt_checkpoint_is_one_line(user, tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    line = _one_line_error(_run(user, "-t", f"checkpoints=skdigits={bad}", results=tmp_path))
    assert line.startswith(f"error: checkpoint {bad} is not a readable safetensors/torch state dict: ")


def test_shape_mismatch_is_one_line_naming_block_and_file(user, tmp_path):
    wrong = dict(user["tuned"][0])
    wrong[BLOCK] = torch.zeros(7, 32)
    path = tmp_path / "skdigits.safetensors"
    save_state_dict(wrong, path)
    line = _one_line_error(_run(user, "-t", f"checkpoints={path}", results=tmp_path / "r"))
    assert line == f"error: checkpoint {path}: block '{BLOCK}' has shape (7, 32), expected (128, 32)"


def test_missing_data_set_is_one_line(user, tmp_path):
    ckpt = user["ft"] / "shapes.pt"
    line = _one_line_error(_run(user, "-t", f"checkpoints=cars={ckpt}", results=tmp_path))
    assert line.startswith(f"error: data set 'cars' not found: no folder {user['data'] / 'cars'} and it is "
                           "not built in (fashion, ")


def test_missing_data_root_is_one_line(user, tmp_path):
    r = harness("run", "--task", "addition", "-t", f"pretrained={user['model']}",
                "-t", f"checkpoints={user['ft']}", "--data-root", str(tmp_path / "none"),
                "--results-dir", str(tmp_path))
    assert _one_line_error(r) == (f"error: data root not found: {tmp_path / 'none'} "
                                  "(a folder holding <data_root>/<data set>/<split>/<class>/*.png)")


def test_finetune_command_makes_checkpoints_a_run_uses(user, tmp_path):
    out = tmp_path / "ft"
    r = harness("finetune", "--pretrained", user["model"], "--datasets", "skdigits,shapes",
                "--data-root", str(user["data"]), "--out", str(out), "--steps", "150", "--batch-size", "32",
                "--lr", "3e-3", "--max-n", "300")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["shapes.safetensors", "skdigits.safetensors"]
    gains = [line for line in r.stdout.splitlines() if "test accuracy" in line]
    assert len(gains) == 2
    before, after = (float(v) for v in gains[0].split("test accuracy ")[1].split(";")[0].split(" -> "))
    assert after > before + 0.1  # skdigits: fine-tuning really trained the image tower
    run = _run(user, "-t", f"checkpoints={out}", results=tmp_path / "r")
    assert run.returncode == 0, run.stderr
    rec = json.loads(next((tmp_path / "r").glob("runs/*/record.json")).read_text())
    refs = rec["references"]
    # The saved checkpoints round-trip: the run's fine-tuned and zero-shot references are the accuracies
    # the finetune command printed.
    assert refs["fine-tuned (each its own)"]["acc/skdigits"] == pytest.approx(after, abs=1e-4)
    assert refs["zero-shot"]["acc/skdigits"] == pytest.approx(before, abs=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused_from_the_command_line(user, tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "skdigits.pt"
    torch.save({"state_dict": dict(user["tuned"][0]), "hook": evil}, path)
    line = _one_line_error(_run(user, "-t", f"checkpoints={path}", results=tmp_path / "r"))
    assert line == (f"error: checkpoint {path} was refused: it is a pickle that would run code (posix.system); "
                    "nothing from it was run. Save it with safetensors or as a plain state dict")
    assert not (tmp_path / "pwned").exists()


def test_second_run_reads_references_from_the_cache(user, tmp_path):
    """The fixed cost of a run (the source's zero-shot and fine-tuned accuracies, the task's
    references) is paid once: a second run on the same content reads it from the reference cache,
    with identical figures; other content (another checkpoint) misses."""
    ckpts = f"skdigits={user['ft'] / 'skdigits.safetensors'},{user['ft'] / 'shapes.pt'}"
    cache = tmp_path / "cache"
    first = _run(user, "-t", f"checkpoints={ckpts}", "--cache-dir", str(cache), results=tmp_path / "a")
    second = _run(user, "-t", f"checkpoints={ckpts}", "--cache-dir", str(cache), results=tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = (json.loads(next((tmp_path / d).glob("runs/*/record.json")).read_text()) for d in "ab")
    assert (a["references_cached"], a["source_references_cached"]) == (False, False)
    assert (b["references_cached"], b["source_references_cached"], b["heads_cached"]) == (True, True, True)
    assert a["heads_cached"] is False and b["setup_s"] >= 0
    assert b["input_dtype"] == "torch.uint8" and b["resident_inputs_mb"] > 0
    assert a["references"] == b["references"] and a["final"] == b["final"]
    kinds = sorted(p.name.split("-")[0] for p in (cache / "references").glob("*.json"))
    assert kinds == ["heads", "heads", "source", "task"]  # one head per data set
    # Other weights: both keys miss (the cache never answers for content it did not see).
    other = user["tmp"] / "other.safetensors"
    save_state_dict({"visual." + k: v * 1.5 for k, v in user["tuned"][0].items()}, other)
    third = _run(user, "-t", f"checkpoints=skdigits={other},{user['ft'] / 'shapes.pt'}", "--cache-dir", str(cache),
                 results=tmp_path / "c")
    c = json.loads(next((tmp_path / "c").glob("runs/*/record.json")).read_text())
    assert third.returncode == 0 and (c["references_cached"], c["source_references_cached"]) == (False, False)
    assert c["heads_cached"] is True  # the text tower is the same: only the image tower changed


def test_image_folder_cap_and_unknown_checkpoint_keys(user, tmp_path, capsys):
    from harness.checkpoints import build_clip, clip_task_vectors
    from harness.data import load_image_folder
    full = load_image_folder(str(user["data"] / "shapes"), size=8)
    capped = load_image_folder(str(user["data"] / "shapes"), size=8, max_n=5, seed=0)
    again = load_image_folder(str(user["data"] / "shapes"), size=8, max_n=5, seed=0)
    other = load_image_folder(str(user["data"] / "shapes"), size=8, max_n=5, seed=1)
    assert {s: len(y) for s, (_, y) in full.splits.items()} == {"train": 12, "val": 12, "test": 12}
    assert {s: len(y) for s, (_, y) in capped.splits.items()} == {"train": 5, "val": 5, "test": 5}
    assert all(np.array_equal(capped.splits[s][0], again.splits[s][0]) for s in capped.splits)
    assert any(not np.array_equal(capped.splits[s][0], other.splits[s][0]) for s in capped.splits)
    model, _, _ = build_clip("", user["model"])
    extra = tmp_path / "extra.safetensors"
    save_state_dict({**{"visual." + k: v for k, v in user["tuned"][0].items()}, "visual.adapter.weight": torch.ones(2),
                     "lora_A.weight": torch.ones(2)}, extra)
    capsys.readouterr()
    clip_task_vectors(model, [str(extra)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 key(s) this model does not have, such as ['lora_A.weight', " \
                                      "'visual.adapter.weight']; they are ignored" in err
