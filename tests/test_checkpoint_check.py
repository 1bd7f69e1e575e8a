"""The checkpoint check: each fine-tuned checkpoint must beat the pre-trained model on its own data
set's validation split, or a run refuses (one line, exit 2, nothing recorded) unless trusted.

The pool: the tiny open_clip model of ``conftest.py`` as the pre-trained model and two image-folder
data sets with opposite rules over the same class names (``light``: bright images are ``a``;
``shade``: bright images are ``b``), each fine-tuned for a few dozen steps. Each fine-tune is
right on its own data set and wrong on the other's, so swapping the two files is caught.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import harness.sources.task_check as task_check
from harness.cli import main

RULES = {"light": {"a": 200, "b": 40}, "shade": {"a": 40, "b": 200}}  # class → image brightness


@pytest.fixture(scope="module")
def pool(tiny_open_clip, tmp_path_factory):
    """``{"model", "data", "ft": {data set: checkpoint}, "cache"}``: the model, the image folders,
    one fine-tuned checkpoint per data set and a reference cache for the module."""
    from PIL import Image
    from harness.checkpoints import save_state_dict
    from harness.finetune import finetune
    from harness.sources.open_clip import from_checkpoints
    _, folder = tiny_open_clip
    tmp = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for ds, rule in RULES.items():
        for split in ("train", "val", "test"):
            for label, level in rule.items():
                out = tmp / "data" / ds / split / label
                out.mkdir(parents=True)
                for j in range(12):
                    # Two odd test images per class keep every model's test accuracy off 0 (a run's
                    # normalised accuracy divides by the fine-tuned one's); validation stays clean.
                    odd = split == "test" and j < 2
                    img = np.clip((240 - level if odd else level) + rng.normal(0, 20, (20, 20, 3)), 0, 255)
                    img = img.astype(np.uint8)
                    Image.fromarray(img).save(out / f"{j}.png")
    model = f"local-dir:{folder}"
    source = from_checkpoints("", model, None, list(RULES), str(tmp / "data"))
    ft = {}
    for ds in RULES:
        tv = finetune(source, ds, steps=40, batch_size=16, lr=3e-3, seed=0)
        ft[ds] = tmp / "ft" / f"{ds}.safetensors"
        save_state_dict({f"visual.{k}": source.base[k] + v for k, v in tv.items()}, ft[ds])
    return {"model": model, "data": tmp / "data", "ft": ft, "cache": tmp / "cache"}


def _source_flags(pool, light, shade):
    return ["-t", f"pretrained={pool['model']}", "-t", f"checkpoints=light={light},shade={shade}",
            "--data-root", str(pool["data"]), "--cache-dir", str(pool["cache"])]


def _run(pool, light, shade, results, *extra):
    return main(["run", "--task", "addition", "--searcher", "nevergrad", "--budget", "2", "--quiet",
                 "--results-dir", str(results), *_source_flags(pool, light, shade), *extra])


def _record(results):
    return json.loads(next(results.glob("runs/*/record.json")).read_text())


def test_correct_pool_passes_and_the_run_records_it(pool, tmp_path, capsys):
    assert _run(pool, pool["ft"]["light"], pool["ft"]["shade"], tmp_path) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" not in err and "error" not in err, err
    rec = _record(tmp_path)
    assert rec["status"] == "complete"
    assert rec["checkpoint_check"] == {"passed": True, "trusted": False, "status": {"light": "ok", "shade": "ok"}}


def test_swapped_pair_refuses_in_one_line_naming_both_and_records_nothing(pool, tmp_path, capsys):
    code = _run(pool, pool["ft"]["shade"], pool["ft"]["light"], tmp_path)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("error: checkpoint 'light' does not beat the pre-trained model on light's validation "
                           "split (0.000 vs 0.500), and gains most on shade (+0.50): is it shade's?; "
                           "checkpoint 'shade' does not beat"), line
    assert "is it light's?" in line and "--trust-checkpoints" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_trust_switch_runs_the_swapped_pair_with_warnings(pool, tmp_path, capsys):
    assert _run(pool, pool["ft"]["shade"], pool["ft"]["light"], tmp_path, "--trust-checkpoints") == 0
    err = capsys.readouterr().err
    warnings = [w for w in err.splitlines() if w.startswith("warning: checkpoint")]
    assert len(warnings) == 2 and all("proceeding (checkpoints trusted)" in w for w in warnings), err
    rec = _record(tmp_path)
    assert rec["status"] == "complete"
    assert rec["checkpoint_check"] == {"passed": False, "trusted": True, "status": {"light": "fail", "shade": "fail"}}


def test_refused_rerun_puts_the_recorded_run_back(pool, tmp_path, capsys):
    """Files swapped in place (same paths, so the same run id): ``--rerun`` is refused and the run
    recorded before is left as it was."""
    ft = tmp_path / "ft"
    ft.mkdir()
    light, shade = ft / "light.safetensors", ft / "shade.safetensors"
    shutil.copy(pool["ft"]["light"], light)
    shutil.copy(pool["ft"]["shade"], shade)
    assert _run(pool, light, shade, tmp_path / "r") == 0
    run_dir = next((tmp_path / "r").glob("runs/*"))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    shutil.copy(pool["ft"]["shade"], light)
    shutil.copy(pool["ft"]["light"], shade)
    capsys.readouterr()
    assert _run(pool, light, shade, tmp_path / "r", "--rerun") == 2
    assert "does not beat" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before


def test_check_checkpoints_command_prints_the_table_and_exits_by_verdict(pool, capsys):
    ok = main(["check-checkpoints", *_source_flags(pool, pool["ft"]["light"], pool["ft"]["shade"])])
    out = capsys.readouterr().out
    assert ok == 0, out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert out.splitlines()[1].split() == ["light", "shade", "check"]
    assert rows["pre-trained"] == ["0.500", "0.500"]
    assert rows["light"] == ["[1.000]", "0.000", "ok"] and rows["shade"] == ["0.000", "[1.000]", "ok"]
    bad = main(["check-checkpoints", *_source_flags(pool, pool["ft"]["shade"], pool["ft"]["light"])])
    out = capsys.readouterr().out
    assert bad == 1, out
    assert [line.split()[-1] for line in out.splitlines()[3:5]] == ["FAIL", "FAIL"]
    assert "FAIL: checkpoint 'light' does not beat the pre-trained model" in out
    # Bad input: one line, exit 2.
    missing = pool["ft"]["light"].parent / "nope.safetensors"
    assert main(["check-checkpoints", *_source_flags(pool, missing, pool["ft"]["shade"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint not found: {missing} (task option checkpoints)"]
    assert main(["check-checkpoints", "--task", "quadratic"]) == 2
    assert "builds no model source" in capsys.readouterr().err


def test_the_table_is_cached_with_the_source_references(pool, monkeypatch):
    """The second build of the same content reads the table from the reference cache."""
    from harness.sources.open_clip import from_checkpoints
    ckpts = [str(pool["ft"]["light"]), str(pool["ft"]["shade"])]
    first = from_checkpoints("", pool["model"], ckpts, list(RULES), str(pool["data"]),
                             reference_cache=str(pool["cache"]))
    monkeypatch.setattr(task_check, "accuracy_table", lambda s: pytest.fail("recomputed"))
    second = from_checkpoints("", pool["model"], ckpts, list(RULES), str(pool["data"]),
                              reference_cache=str(pool["cache"]))
    assert second.meta["references_cached"] is True
    assert second.meta["checkpoint_check"] == first.meta["checkpoint_check"]


def _table(rows, chance=0.1, n=64):
    names = [k for k in rows if k != task_check.PRETRAINED]
    return {"datasets": names, "sizes": {d: n for d in names}, "chance": {d: chance for d in names},
            "rows": {k: dict(zip(names, v)) for k, v in rows.items()}}


def test_judge_lines_and_statuses():
    tab = _table({"pre-trained": [0.455, 0.40, 0.50, 0.30],
                  "dtd": [0.212, 0.71, 0.52, 0.31],       # eurosat's: refused
                  "eurosat": [0.60, 0.90, 0.51, 0.30],    # gains most on its own: ok
                  "mnist": [0.46, 0.85, 0.90, 0.30],      # gains more on eurosat: a warning
                  "svhn": [0.40, 0.35, 0.45, 0.20]})      # gains nowhere: refused
    v = {x.checkpoint: x for x in task_check.judge(tab)}
    assert {k: x.status for k, x in v.items()} == {"dtd": "fail", "eurosat": "ok", "mnist": "warn", "svhn": "fail"}
    assert v["dtd"].line() == ("checkpoint 'dtd' does not beat the pre-trained model on dtd's validation split "
                               "(0.212 vs 0.455), and gains most on eurosat (+0.31): is it eurosat's?")
    assert v["svhn"].line().endswith("(0.200 vs 0.300), and gains on no data set: is it fine-tuned?")
    assert v["mnist"].line() == ("checkpoint 'mnist' gains more on eurosat (+0.45) than on its own data set mnist "
                                 "(+0.40): is it eurosat's?")
    with pytest.raises(task_check.CheckpointMismatch) as e:
        task_check.enforce(list(v.values()), log=lambda m: None, trust=False)
    assert "\n" not in str(e.value) and "'dtd'" in str(e.value) and "'svhn'" in str(e.value)
    logged = []
    summary = task_check.enforce(list(v.values()), log=logged.append, trust=True)
    assert summary["trusted"] and len(logged) == 3  # two trusted failures and one warning
    # A data set where no model beats its most frequent class leaves its checkpoint unjudged.
    flat = _table({"pre-trained": [0.5, 0.5], "a": [0.5, 0.5], "b": [0.45, 0.55]}, chance=0.5, n=24)
    assert [x.status for x in task_check.judge(flat)] == ["unjudged", "unjudged"]
    # A checkpoint at 100 % on its own data set is never refused, even when the pre-trained one is too.
    top = _table({"pre-trained": [1.0, 0.5], "a": [1.0, 0.5], "b": [0.5, 1.0]}, chance=0.5, n=64)
    assert [x.status for x in task_check.judge(top)] == ["ok", "ok"]
    assert math.isclose(task_check.judge(top)[1].gain, 0.5)


def test_trust_switches(monkeypatch):
    from harness.cli_parser import build_parser
    monkeypatch.delenv(task_check.ENV_TRUST, raising=False)
    assert not task_check.trusted()
    with task_check.trusting():
        assert task_check.trusted()
    assert not task_check.trusted()
    monkeypatch.setenv(task_check.ENV_TRUST, "1")
    assert task_check.trusted()
    for command in ("run", "sweep"):
        assert build_parser().parse_args([command, "--trust-checkpoints"]).trust_checkpoints is True


def test_zoos_carry_no_check_and_subsets_are_fixed():
    """The built-in zoos are not checked by a run (they fine-tune their own task vectors); the
    subset of a data set is the same every time and depends only on its name and size."""
    assert task_check.table_of(object()) is None
    a, b = task_check.subset_indices(500, "dtd"), task_check.subset_indices(500, "dtd")
    assert (a == b).all() and len(a) == task_check.SUBSET and (np.diff(a) > 0).all()
    assert not (a == task_check.subset_indices(500, "eurosat")).all()
    assert len(task_check.subset_indices(10, "dtd")) == 10


def test_python_api_refuses_and_trusts_like_the_cli(pool, tmp_path):
    import harness
    opts = {"pretrained": str(pool["model"]), "checkpoints": f"light={pool['ft']['shade']},shade={pool['ft']['light']}",
            "data_root": str(pool["data"])}
    kw = {"budget": 2, "task_options": opts, "cache_dir": str(pool["cache"])}
    with pytest.raises(harness.HarnessError, match="does not beat the pre-trained model"):
        harness.run("addition", "nevergrad", results_dir=tmp_path / "refused", **kw)
    assert not list((tmp_path / "refused").glob("runs/*/record.json"))
    r = harness.run("addition", "nevergrad", results_dir=tmp_path / "trusted", trust_checkpoints=True, **kw)
    assert r.status == "complete" and r.record["checkpoint_check"]["trusted"] is True
