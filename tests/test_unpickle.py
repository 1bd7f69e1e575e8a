"""The paper's checkpoints: whole pickled models read without running any code from them."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.api import HarnessError
from harness.checkpoints import clip_task_vectors, load_state_dict
from harness.unpickle import recover_state_dict

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

# A throwaway module like the paper's src/modeling.py: an ImageEncoder holding an open_clip CLIP
# and its preprocessing transforms. It is imported, used to torch.save whole models, then deleted.
WRAPPER = textwrap.dedent("""
    import torch
    import open_clip

    class ImageEncoder(torch.nn.Module):
        def __init__(self, arch, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.model = open_clip.CLIP(**arch)
            self.train_preprocess = open_clip.image_transform(32, True)
            self.val_preprocess = open_clip.image_transform(32, False)
            self.cache_dir = "/nonexistent"

        def forward(self, images):
            return self.model.encode_image(images)
""")


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """Pre-trained and two fine-tuned ImageEncoders saved whole (torch.save(model)), the module that
    defines them then removed; and the same weights as plain state dicts, for comparison."""
    tmp = tmp_path_factory.mktemp("paper")
    (tmp / "paper_modeling.py").write_text(WRAPPER)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp)!r})
        from paper_modeling import ImageEncoder
        arch = {ARCH!r}
        base = ImageEncoder(arch, 0)
        torch.save(base, {str(tmp / 'zeroshot.pt')!r})
        torch.save(base.model.state_dict(), {str(tmp / 'zeroshot_sd.pt')!r})
        for i, name in enumerate(["skdigits", "lfw"]):
            ft = ImageEncoder(arch, 0)
            with torch.no_grad():
                for p in ft.model.visual.parameters():
                    p.add_(0.01 * (i + 1) * torch.randn_like(p))
            torch.save(ft, {str(tmp)!r} + f"/{{name}}.pt")
            torch.save(ft.model.state_dict(), {str(tmp)!r} + f"/{{name}}_sd.pt")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (tmp / "paper_modeling.py").unlink()  # the class can no longer be imported by anyone
    return tmp


def test_torch_itself_refuses_the_pickle_and_we_recover_the_same_weights(pickles):
    with pytest.raises(Exception):
        torch.load(pickles / "skdigits.pt", weights_only=True)
    recovered = recover_state_dict(str(pickles / "skdigits.pt"))
    plain = torch.load(pickles / "skdigits_sd.pt", weights_only=True)
    assert {k[len("model."):] for k in recovered if k.startswith("model.")} == set(plain)
    for k, v in plain.items():
        assert torch.equal(recovered["model." + k], v), k
    sd = load_state_dict(pickles / "skdigits.pt")  # the loader every path uses: model. stripped
    assert set(sd) == set(plain) and all(torch.equal(sd[k], plain[k]) for k in plain)


def test_task_vectors_from_pickles_equal_those_from_state_dicts(pickles):
    import open_clip
    model = open_clip.CLIP(**ARCH)
    model.load_state_dict(torch.load(pickles / "zeroshot_sd.pt", weights_only=True))
    _, from_pickles = clip_task_vectors(model, [str(pickles / "skdigits.pt"), str(pickles / "lfw.pt")])
    _, from_plain = clip_task_vectors(model, [str(pickles / "skdigits_sd.pt"), str(pickles / "lfw_sd.pt")])
    for a, b in zip(from_pickles, from_plain):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert max(v.abs().max() for v in a.values()) > 0


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"weights": torch.zeros(2), "hook": evil}, tmp_path / "evil.pt")
    with pytest.raises(HarnessError, match=r"was refused: it is a pickle that would run code \(posix.system\)"):
        recover_state_dict(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_run_end_to_end_on_the_paper_style_pickles(pickles, tmp_path):
    """The paper's files on the command line: pre-trained and fine-tuned models as whole pickles."""
    d = pickles
    (tmp_path / "model").mkdir()
    cfg = {"model_cfg": ARCH, "preprocess_cfg": {}}
    (tmp_path / "model" / "open_clip_config.json").write_text(json.dumps(cfg))
    reg = textwrap.dedent(f"""
        import json, sys, open_clip
        from pathlib import Path
        p = Path({str(tmp_path)!r}) / "tiny-paper.json"
        p.write_text(json.dumps({ARCH!r}))
        open_clip.add_model_config(p)
        sys.argv = ["harness", "run", "--searcher", "task-arithmetic", "-t", "model=tiny-paper",
                    "-t", "pretrained={d / 'zeroshot.pt'}", "-t", "checkpoints={d / 'skdigits.pt'},{d / 'lfw.pt'}",
                    "-t", "source_options=max_n=100", "--results-dir", {str(tmp_path / 'res')!r}, "--quiet"]
        from harness.cli import main
        raise SystemExit(main())
    """)
    r = subprocess.run([sys.executable, "-c", reg], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*/record.json")]
    assert rec["status"] == "complete" and rec["task_vectors"] == ["skdigits", "lfw"]
