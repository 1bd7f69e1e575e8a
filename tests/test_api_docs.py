"""The Python API page (docs/api.md): every example runs, top to bottom, and its asserts hold."""
import os
import re
from pathlib import Path

import pytest

import harness

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_examples_for_every_exported_function():
    code = "\n".join(_blocks())
    for name in ("run", "sweep", "leaderboard", "load_run", "compose", "task_vector"):
        assert f"harness.{name}(" in code, name
    assert set(harness.__all__) >= {"run", "sweep", "leaderboard", "load_run", "compose", "Run", "HarnessError"}


@pytest.mark.timeout(900)
def test_the_api_examples_run(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATLAS_HARNESS_CACHE", cache_dir)
    namespace: dict = {}
    for i, block in enumerate(_blocks(), 1):
        exec(compile(block, f"docs/api.md example {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "complete" in out and "searcher option lr must be > 0" in out
    # The runs landed where the CLI would put them, and the CLI ranks them too.
    assert len(list((tmp_path / "results" / "runs").iterdir())) >= 3
    assert os.path.isfile(namespace["run"].path / "record.json")


def test_no_submodule_shadows_an_api_function():
    """Importing ``harness.X`` sets the attribute ``harness.X`` to that module, so no module may be
    named after a function the package exports."""
    import importlib
    import pkgutil
    for mod in pkgutil.walk_packages(harness.__path__, "harness."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in harness.__all__:
        assert not type(getattr(harness, name)).__name__ == "module", name
    assert harness.sweep.__module__ == harness.leaderboard.__module__ == "harness.python_api"


def test_bad_python_values_are_harness_errors_and_record_nothing(tmp_path):
    import numpy as np
    import torch
    base = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2), "steps": torch.tensor(7)}
    cats = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
    dogs = {"fc.weight": torch.full((2, 2), 2.0), "fc.bias": torch.zeros(2)}
    res = tmp_path / "res"
    cases = [
        (lambda: harness.compose(base, {"cats": cats}, None), "finite numbers"),
        (lambda: harness.compose(base, {"cats": cats}, {"cats": float("inf")}), "finite numbers"),
        (lambda: harness.compose(base, {"cats": cats}, "abc"), "must be numbers"),
        (lambda: harness.compose(base, {"cats": cats, "dogs": dogs}, {"cats": 1.0, "dogs": 0.0}, space="lines"),
         "per_task, per_layer, per_block or per_partition:K"),
        (lambda: harness.compose({"fc.weight": np.zeros((2, 2))}, {"cats": cats}, 1.0), "must be a torch tensor"),
        (lambda: harness.task_vector(base, None), "must be a state dict"),
        (lambda: harness.load_run(5, res), "run_id must be a string"),
        (lambda: harness.run("quadratic", "random", budget=5, task_options=["dim=3"], results_dir=res),
         "task_options must be a mapping"),
        (lambda: harness.run("quadratic", "random", budget=5, space="per_foo", results_dir=res),
         "unknown coefficient space"),
        (lambda: harness.run("quadratic", "random", budget=5, task_options={"delay": -1.0}, results_dir=res),
         "delay must be >= 0"),
    ]
    for call, match in cases:
        with pytest.raises(harness.HarnessError, match=re.escape(match)):
            call()
    assert not res.exists()
    # a coefficient tensor that requires grad composes like its values
    out = harness.compose(base, {"cats": cats}, torch.tensor([0.5], requires_grad=True), space="per_task")
    assert torch.equal(out["fc.weight"], torch.full((2, 2), 0.5))


def test_a_run_object_outlives_a_change_of_directory_and_a_failed_run_has_no_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = harness.run("quadratic", "random", budget=4, results_dir=None)  # None: the default, ./results
    assert (tmp_path / "results" / "runs" / run.run_id).is_dir() and run.path.is_absolute()
    monkeypatch.chdir("/")
    assert len(run.trace) == 4 and run.coefficients["x"].shape == (8,)
    assert harness.load_run(run.run_id, tmp_path / "results").score == pytest.approx(run.score)
    with pytest.raises(harness.HarnessError, match="all 6 evaluations failed"):
        harness.run("quadratic", "random", budget=6, task_options={"nan_above": -2.0},
                    results_dir=tmp_path / "results")
    (failed,) = [d.name for d in (tmp_path / "results" / "runs").iterdir() if d.name != run.run_id]
    loaded = harness.load_run(failed, tmp_path / "results")
    assert loaded.status == "failed" and loaded.score is None
    record = tmp_path / "results" / "runs" / failed / "record.json"
    record.write_text('{"run_id": "x", "status": "complete", "final": [1, 2]}')
    with pytest.raises(harness.HarnessError, match="is damaged"):
        harness.load_run(failed, tmp_path / "results")


def test_sweep_arguments_are_checked_like_a_sweep_file(tmp_path):
    res = tmp_path / "res"
    for kw, match in ((dict(seeds=3), "seeds must be a non-empty list"), (dict(seeds=[]), "seeds must be"),
                      (dict(searchers=[{"budget": 4}]), "has no name"), (dict(searchers=[5]), "searchers must be"),
                      (dict(searchers=[{"name": "random", "bugdet": 9}]), "unknown key 'bugdet'"),
                      (dict(tasks="quadratic"), "tasks must be a non-empty list"),
                      (dict(task_options=["dim=2"]), "task_options must be a mapping")):
        args = {**dict(tasks=["quadratic"], searchers=["random"], seeds=[0], results_dir=res), **kw}
        with pytest.raises(harness.HarnessError, match=re.escape(match)):
            harness.sweep(**args)
    assert not res.exists()
    board = harness.sweep(tasks=("quadratic",), searchers=[{"name": "random", "budget": 3}], seeds=range(2),
                          results_dir=res)
    assert len(board) == 1 and int(board["n"].iloc[0]) == 2


def test_a_target_the_source_lacks_is_refused_and_leaves_no_run_behind(tmp_path, cache_dir):
    res = tmp_path / "res"
    opts = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15",
            "shots": 1, "target": "mnist"}
    with pytest.raises(harness.HarnessError, match="target 'mnist' is not in source 'tiny-clip'; valid: skdigits"):
        harness.run("few_shot", "gradient", budget=5, task_options=opts, results_dir=res, cache_dir=cache_dir)
    assert not (res / "runs").exists() or not any((res / "runs").iterdir())


def test_compose_returns_each_entry_in_its_base_dtype():
    """The merge runs in fp32; a fp64 or fp16 base gets its own dtype back (it loads into its model),
    with the values of the fp32 sum, and integer buffers are passed through untouched."""
    import torch
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "h": torch.tensor([0.5, 1.5], dtype=torch.float16),
            "n": torch.tensor(7)}
    tvs = {"a": {"w": torch.tensor([0.5, -1.0]), "h": torch.tensor([1.0, 1.0])}}
    out = harness.compose(base, tvs, 0.5, space="per_task")
    assert out["w"].dtype == torch.float64 and out["h"].dtype == torch.float16 and out["n"] is base["n"]
    assert out["w"].tolist() == [1.25, 1.5] and out["h"].tolist() == [1.0, 2.0]


def test_task_vector_moves_a_finetuned_entry_to_the_base_device_or_says_why_not():
    """A fine-tuned entry on another device is moved to its base entry's (the difference is taken
    there); one that cannot be moved (a meta tensor has no data) is a one-line HarnessError."""
    import torch
    base = {"w": torch.tensor([1.0, 2.0])}
    tv = harness.task_vector(base, {"w": torch.tensor([1.5, 1.0], dtype=torch.float64)})
    assert tv["w"].device == base["w"].device and tv["w"].tolist() == [0.5, -1.0]
    with pytest.raises(harness.HarnessError, match=r"^fine-tuned block 'w' is on meta and cannot be moved to the base's "
                                           r"device cpu: Cannot copy out of meta tensor"):
        harness.task_vector(base, {"w": torch.zeros(2, device="meta")})
