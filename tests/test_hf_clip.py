"""Hugging Face CLIP checkpoints (FusionBench's layout) through the hf_clip source, checked against
transformers' own modules on tiny models built from configs (no download)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import save_file

from harness.api import Candidate, HarnessError
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel  # the test extra: pip install -e ".[test]"

from harness.api import Candidate, HarnessError
from harness.checkpoints import build_clip
from harness.sources.hf_clip import convert

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                             max_position_embeddings=16, vocab_size=49408),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                               image_size=32, patch_size=8),
            projection_dim=24)


def tower(vis):
    """The vision transformer inside a CLIPVisionModel (transformers 5 flattens it into the model)."""
    return getattr(vis, "vision_model", vis)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny CLIPModel folder and three CLIPVisionModel fine-tunes: two saved by transformers 5
    (keys without ``vision_model.``), one in transformers 4's layout (with it), as FusionBench has."""
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY)).eval()
    model.save_pretrained(tmp / "pretrained")
    tunes = {}
    for i, name in enumerate(["skdigits", "lfw", "textures"]):
        vis = CLIPVisionModel(model.config.vision_config)
        tower(vis).load_state_dict(model.vision_model.state_dict())
        with torch.no_grad():
            for p in vis.parameters():
                p.add_(0.02 * (i + 1) * torch.randn_like(p))
        tunes[name] = vis.eval()
        if name == "textures":
            (tmp / name).mkdir()
            sd = {f"vision_model.{k}": v.contiguous() for k, v in tower(vis).state_dict().items()}
            save_file(sd, str(tmp / name / "model.safetensors"))
            (tmp / name / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
        else:
            vis.save_pretrained(tmp / name)
    return tmp, model, tunes


def test_image_and_text_features_equal_transformers(hf, tmp_path):
    tmp, model, _ = hf
    local, _ = convert(str(tmp / "pretrained"), [], tmp_path)
    oc, _, tokenizer = build_clip("", local)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = oc.encode_image(x)
        theirs = model.get_image_features(pixel_values=x).pooler_output
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        tokens = tokenizer(["a photo of a cat.", "a drawing of a dog."])
        t_ours = oc.encode_text(tokens)
        t_theirs = model.get_text_features(input_ids=tokens).pooler_output
        assert (t_ours - t_theirs).abs().max() <= 1e-5 * t_theirs.abs().max()
        assert float(oc.logit_scale) == pytest.approx(float(model.logit_scale))


def test_task_vectors_are_the_fine_tunes_minus_the_base_in_both_layouts(hf, tmp_path):
    tmp, model, tunes = hf
    from harness.sources.open_clip import from_checkpoints
    local, paths = convert(str(tmp / "pretrained"), [(n, str(tmp / n)) for n in tunes], tmp_path)
    src = from_checkpoints("", local, paths, list(tunes), max_n=60)
    assert len(src.base) == 2 * 12 + 8  # q/k/v are one in_proj block per layer
    for name, vis in tunes.items():
        base, ft = model.vision_model.encoder.layers[1].self_attn, tower(vis).encoder.layers[1].self_attn
        want = torch.cat([ft.q_proj.weight - base.q_proj.weight, ft.k_proj.weight - base.k_proj.weight,
                          ft.v_proj.weight - base.v_proj.weight])
        got = src.task_vectors[name]["transformer.resblocks.1.attn.in_proj_weight"]
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(src.task_vectors[name]["proj"], torch.zeros_like(src.base["proj"]))


def test_task_arithmetic_merge_equals_theta0_plus_alpha_sum_tau(hf, tmp_path):
    tmp, model, tunes = hf
    from harness.config import resolve_options
    from atlas_harness_tasks.addition import AdditionTask
    opts = resolve_options(AdditionTask, {"pretrained": str(tmp / "pretrained"),
                                          "checkpoints": [f"{n}={tmp / n}" for n in ("skdigits", "lfw")],
                                          "source_options": "max_n=60", "search_n": 16}, "task")
    AdditionTask.validate(opts)
    task = AdditionTask(opts, space="per_task", seed=0, cache_dir=str(tmp_path))
    task.setup("cpu")
    assert task.provenance()["source"]["name"] == "hf_clip"
    merged = task.engine.params(task.comp.isotropic(0.3), False)[0]
    fc = [tower(vis).encoder.layers[0].mlp.fc1.weight for vis in (tunes["skdigits"], tunes["lfw"])]
    theta0 = model.vision_model.encoder.layers[0].mlp.fc1.weight
    want = theta0 + 0.3 * sum(f - theta0 for f in fc)
    assert torch.allclose(merged["transformer.resblocks.0.mlp.c_fc.weight"], want, atol=1e-6)


def test_a_run_on_hf_checkpoints_from_the_command_line(hf, tmp_path):
    tmp, _, _ = hf
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--searcher", "task-arithmetic",
                        "-t", f"pretrained={tmp / 'pretrained'}",
                        "-t", f"checkpoints=skdigits={tmp / 'skdigits'},lfw={tmp / 'lfw'}",
                        "-t", "source_options=max_n=60", "--cache-dir", str(tmp_path / "cache"),
                        "--results-dir", str(tmp_path / "res"), "--quiet"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*/record.json")]
    assert rec["status"] == "complete" and rec["plugins"]["source"]["name"] == "hf_clip"
    assert np.isfinite(rec["final"]["normalized_acc"])


def test_malformed_hf_inputs_are_one_line_errors(hf, tmp_path):
    tmp, _, _ = hf
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(HarnessError, match="has no config.json"):
        convert(str(tmp_path / "noconfig"), [], tmp_path / "a")
    with pytest.raises(HarnessError, match="must be a full CLIPModel"):
        convert(str(tmp / "skdigits"), [], tmp_path / "b")
    other = dict(TINY, vision_config=dict(TINY["vision_config"], hidden_size=48, intermediate_size=96))
    big = CLIPVisionModel(CLIPConfig(**other).vision_config)
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(HarnessError, match="different base model"):
        convert(str(tmp / "pretrained"), [("x", str(tmp_path / "big"))], tmp_path / "c")


def test_lora_adapters_are_task_vectors_equal_to_peft_merge(hf, tmp_path):
    from peft import LoraConfig, get_peft_model
    tmp, model, _ = hf
    vis = CLIPVisionModel(model.config.vision_config)
    tower(vis).load_state_dict(model.vision_model.state_dict())
    torch.manual_seed(3)
    peft_model = get_peft_model(vis, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                                init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    merged = peft_model.merge_and_unload().eval()
    merged.save_pretrained(tmp_path / "merged")
    from harness.sources.open_clip import from_checkpoints
    local, paths = convert(str(tmp / "pretrained"), [("skdigits", str(tmp_path / "lora")),
                                                     ("lfw", str(tmp_path / "merged"))], tmp_path / "out")
    src = from_checkpoints("", local, paths, ["skdigits", "lfw"], max_n=60)
    a, b = src.task_vectors["skdigits"], src.task_vectors["lfw"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert a["transformer.resblocks.0.attn.in_proj_weight"].abs().max() > 0  # q and v moved
    k_rows = a["transformer.resblocks.0.attn.in_proj_weight"][32:64]
    assert k_rows.abs().max() == 0  # k was not a target


def test_a_lora_rank_mismatch_is_one_line(hf, tmp_path):
    from peft import LoraConfig, get_peft_model
    tmp, model, _ = hf
    vis = CLIPVisionModel(model.config.vision_config)
    get_peft_model(vis, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HarnessError, match="LoRA rank mismatch"):
        convert(str(tmp / "pretrained"), [("x", str(tmp_path / "lora"))], tmp_path / "out")


def test_convert_writes_plain_safetensors_that_run_the_same(hf, tmp_path):
    tmp, _, _ = hf
    cmd = [sys.executable, "-m", "harness", "convert", "--pretrained", str(tmp / "pretrained"),
           "--checkpoints", f"skdigits={tmp / 'skdigits'},lfw={tmp / 'textures'}", "--out", str(tmp_path / "conv")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "conv" / "manifest.json").read_text())
    assert manifest["format_read"] == "hugging face" and len(manifest["read"]) == 3
    assert all(len(x["sha256"]) == 64 for x in manifest["read"])
    runs = {}
    for label, opts in (("hf", ["-t", f"pretrained={tmp / 'pretrained'}",
                                "-t", f"checkpoints=skdigits={tmp / 'skdigits'},lfw={tmp / 'textures'}"]),
                        ("converted", manifest["use"].replace("-t ", "").split(" "))):
        if label == "converted":
            opts = [x for o in opts for x in ("-t", o)]
        r = subprocess.run([sys.executable, "-m", "harness", "run", "--searcher", "task-arithmetic", *opts,
                            "-t", "source_options=max_n=60", "--cache-dir", str(tmp_path / "cache"),
                            "--results-dir", str(tmp_path / label), "--quiet"], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / label / "runs").glob("*/record.json")]
        runs[label] = rec
    assert runs["hf"]["final"] == runs["converted"]["final"]
    assert runs["hf"]["family"] == runs["converted"]["family"]  # the same weights, whatever the layout


def test_every_format_of_one_model_gives_the_same_task_vectors_and_run(hf, tmp_path):
    """One model and two fine-tunes as Hugging Face folders, as open_clip state dicts (torch files)
    and as paper-style whole pickles (wrapper class deleted after saving): the same family (content
    hash of θ0 and of the task vectors) and the same run result for a fixed seed."""
    import textwrap
    tmp, _, _ = hf
    local, paths = convert(str(tmp / "pretrained"), [(n, str(tmp / n)) for n in ("skdigits", "lfw")], tmp_path / "oc")
    model_dir = Path(local[len("local-dir:"):])
    arch = json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"]
    mod = tmp_path / "paper_wrap.py"
    mod.write_text(textwrap.dedent("""
        import torch, open_clip
        class ImageEncoder(torch.nn.Module):
            def __init__(self, arch, state):
                super().__init__()
                self.model = open_clip.CLIP(**arch)
                self.model.load_state_dict(state)
                self.val_preprocess = open_clip.image_transform(32, False)
    """))
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file
        sys.path.insert(0, {str(tmp_path)!r})
        from paper_wrap import ImageEncoder
        base = load_file({str(model_dir / 'open_clip_model.safetensors')!r})
        torch.save(base, {str(tmp_path / 'base_sd.pt')!r})
        torch.save(ImageEncoder({arch!r}, base), {str(tmp_path / 'base_pickle.pt')!r})
        for name, path in {list(zip(('skdigits', 'lfw'), paths))!r}:
            ft = dict(base, **load_file(path))
            torch.save(ft, {str(tmp_path)!r} + f"/{{name}}_sd.pt")
            torch.save(ImageEncoder({arch!r}, ft), {str(tmp_path)!r} + f"/{{name}}_pickle.pt")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mod.unlink()
    cfg_path = tmp_path / "tiny-hf.json"
    cfg_path.write_text(json.dumps(arch))
    formats = {
        "hf": [f"pretrained={tmp / 'pretrained'}", f"checkpoints=skdigits={tmp / 'skdigits'},lfw={tmp / 'lfw'}"],
        "state dict": ["model=tiny-hf", f"pretrained={tmp_path / 'base_sd.pt'}",
                       f"checkpoints=skdigits={tmp_path / 'skdigits_sd.pt'},lfw={tmp_path / 'lfw_sd.pt'}"],
        "pickle": ["model=tiny-hf", f"pretrained={tmp_path / 'base_pickle.pt'}",
                   f"checkpoints=skdigits={tmp_path / 'skdigits_pickle.pt'},lfw={tmp_path / 'lfw_pickle.pt'}"],
    }
    records = {}
    for label, opts in formats.items():
        args = ["run", "--searcher", "nevergrad", "--budget", "12", "--seed", "0", "-t", "source_options=max_n=60",
                *[x for o in opts for x in ("-t", o)], "--cache-dir", str(tmp_path / "cache"),
                "--results-dir", str(tmp_path / "res" / label.replace(" ", "_")), "--quiet"]
        script = ("import open_clip, sys; open_clip.add_model_config(sys.argv[1]); from harness.cli import main; "
                  "raise SystemExit(main(sys.argv[2:]))")
        r = subprocess.run([sys.executable, "-c", script, str(cfg_path), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
        assert r.returncode == 0, (label, r.stderr)
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "res" / label.replace(" ", "_")).glob("runs/*/record.json")]
        records[label] = rec
    fams = {label: rec["family"] for label, rec in records.items()}
    assert len({json.dumps(f, sort_keys=True) for f in fams.values()}) == 1, fams
    finals = [rec["final"] for rec in records.values()]
    assert finals[0] == finals[1] == finals[2]
    assert records["hf"]["plugins"]["source"]["name"] == "hf_clip"
    assert records["pickle"]["plugins"]["source"]["name"] == "open_clip"


def test_a_suite_finds_fusionbench_named_folders_and_parquet_data(hf, tmp_path):
    """``-t suite=ta8 -t checkpoints=DIR``: each task's CLIPVisionModel folder is found under
    FusionBench's name (``<model>_<key>``), the data as Parquet shards; results use ta8's names."""
    import shutil
    from harness.data.suites import spec, suite
    from harness.cli import main
    from tests.hfdata import make_hf
    tmp, _, tunes = hf
    names = list(tunes)
    for k, task in enumerate(suite("ta8")):
        shutil.copytree(tmp / names[k % len(names)], tmp_path / "ckpt" / f"clip-vit-tiny_{task}")
        make_hf(tmp_path / "data", task, {"train": 10, "test": 12}, n_classes=2, seed=k)
    rc = main(["run", "--searcher", "task-arithmetic", "-s", "points=2", "-t", "suite=ta8",
               "-t", f"pretrained={tmp / 'pretrained'}", "-t", f"checkpoints={tmp_path / 'ckpt'}",
               "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
               "--results-dir", str(tmp_path / "res"), "--quiet"])
    assert rc == 0
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*/record.json")]
    assert rec["status"] == "complete" and rec["plugins"]["source"]["name"] == "hf_clip"
    assert [k[4:] for k in rec["final"] if k.startswith("acc/")] == suite("ta8")
    assert rec["family"]["benchmark"]["suite"] == "ta8"
    # A task without a checkpoint is named in one line.
    shutil.rmtree(tmp_path / "ckpt" / "clip-vit-tiny_dtd")
    with pytest.raises(HarnessError, match=r"suite ta8: no checkpoint for dtd in "):
        from harness.objective import resolve_source
        from atlas_harness_tasks.addition import AdditionTask
        opts = AdditionTask.Options(suite="ta8", pretrained=str(tmp / "pretrained"),
                                    checkpoints=[str(tmp_path / "ckpt")], data_root=str(tmp_path / "data"))
        resolve_source(opts)


def _peft_factor_task(hf, tmp_path, adapters):
    """A factor-form addition task over PEFT LoRA adapters saved for skdigits and lfw;
    ``adapters`` is one (seed, rank, target modules) per data set."""
    from peft import LoraConfig, get_peft_model
    from harness.config import resolve_options
    from atlas_harness_tasks.addition import AdditionTask
    tmp, model, _ = hf
    names = ["skdigits", "lfw"]
    for name, (seed, r, targets) in zip(names, adapters):
        vis = CLIPVisionModel(model.config.vision_config)
        tower(vis).load_state_dict(model.vision_model.state_dict())
        torch.manual_seed(seed)
        get_peft_model(vis, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                       init_lora_weights=False)).save_pretrained(tmp_path / name)
    opts = resolve_options(AdditionTask, {"pretrained": str(tmp / "pretrained"), "lora_form": "factors",
                                          "checkpoints": [f"{n}={tmp_path / n}" for n in names],
                                          "source_options": "max_n=60", "search_n": 16}, "task")
    AdditionTask.validate(opts)
    task = AdditionTask(opts, space="per_block", seed=0, cache_dir=str(tmp_path / "cache"))
    task.setup("cpu")
    return task


def test_peft_adapters_compose_in_factor_form(hf, tmp_path):
    """Two PEFT LoRA adapters (q, v, fc1 and the out projection) load as factors in open_clip's
    names: each one alone is its dense task vector, q/v share in_proj through a block-diagonal B,
    and lora_form=factors composes them with their cross terms."""
    from harness.lora import FactorComposition
    qvfo = ["q_proj", "v_proj", "fc1", "out_proj"]
    task = _peft_factor_task(hf, tmp_path, [(10, 2, qvfo), (11, 2, qvfo)])
    comp, src = task.comp, task.source
    assert isinstance(comp, FactorComposition)
    a, b = src.lora_factors["skdigits"]["transformer.resblocks.0.attn.in_proj_weight"]
    assert a.shape == (4, 32) and b.shape == (96, 4) and not b[32:64].any()  # q and v, rank 2 each; k untouched
    assert len(src.lora_factors["skdigits"]) == 2 * 3  # per layer: in_proj, out_proj, c_fc
    for i, name in enumerate(["skdigits", "lfw"]):
        merged = comp.merge(comp.one_hot(i))
        for k in src.lora_factors[name]:
            torch.testing.assert_close(merged[k], src.base[k] + src.task_vectors[name][k], atol=1e-6, rtol=0)
    x = np.zeros((2, comp.dim // 4, 2))
    x[:, :, 1] = 1.0  # both adapters at λ_A = λ_B = 1: (B1 + B2)(A1 + A2)
    merged = comp.merge(x.reshape(-1))
    (a1, b1), (a2, b2) = (src.lora_factors[n]["transformer.resblocks.1.mlp.c_fc.weight"] for n in ("skdigits", "lfw"))
    torch.testing.assert_close(merged["transformer.resblocks.1.mlp.c_fc.weight"],
                               src.base["transformer.resblocks.1.mlp.c_fc.weight"] + (b1 + b2) @ (a1 + a2))
    ev = task.evaluate([Candidate(x=comp.isotropic(0.5), grad=True)])[0]
    assert np.isfinite(ev.loss) and np.abs(ev.grad).max() > 0


def test_peft_adapters_of_different_ranks_and_targets_compose(hf, tmp_path):
    """One adapter of rank 2 on q, v, fc1 and the out projection, one of rank 3 on k and fc1: both
    load, each alone is its dense task vector, and coefficients exist only where each adapts."""
    task = _peft_factor_task(hf, tmp_path, [(20, 2, ["q_proj", "v_proj", "fc1", "out_proj"]), (21, 3, ["k_proj", "fc1"])])
    comp, src = task.comp, task.source
    a, b = src.lora_factors["lfw"]["transformer.resblocks.0.attn.in_proj_weight"]
    assert a.shape == (3, 32) and b.shape == (96, 3) and not b[:32].any() and not b[64:].any()
    assert comp.dim == 2 * (2 * 3 + 2 * 2)  # skdigits: in_proj, out_proj, c_fc; lfw: in_proj, c_fc; two layers
    for i, name in enumerate(["skdigits", "lfw"]):
        merged = comp.merge(comp.one_hot(i))
        for k in src.base:
            want = src.base[k] + src.task_vectors[name][k] if k in src.lora_factors[name] else src.base[k]
            torch.testing.assert_close(merged[k], want, atol=1e-6, rtol=0)
    ev = task.evaluate([Candidate(x=comp.isotropic(0.5), grad=True)])[0]
    assert np.isfinite(ev.loss) and np.abs(ev.grad).max() > 0
