"""Named presets: each one plans into a valid run, flags override them, the README shows them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.api import HarnessError
from harness.config import build_config
from harness.presets import PRESETS, table
from harness.problem import plan


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_plans(name):
    p = plan(build_config({"preset": name}))
    preset = PRESETS[name]
    assert (p.config.task, p.config.searcher) == (preset.task, preset.searcher)
    for k, v in preset.task_options.items():
        got = p.config.task_options[k]
        assert got == v or (k == "transform" and got.split(":")[0] == v.split(":")[0]), (k, got, v)
    for k, v in preset.searcher_options.items():
        assert p.config.searcher_options[k] == v


def test_flags_override_the_preset():
    cfg = build_config({"preset": "adamerging-layer", "budget": 7, "searcher_options": {"lr": 0.01},
                        "task_options": {"objective": "ce"}})
    assert (cfg.task, cfg.searcher, cfg.space, cfg.budget) == ("addition", "gradient", "per_layer", 7)
    assert cfg.searcher_options == {"warm": 11, "lr": 0.01}
    assert cfg.task_options == {"objective": "ce"}
    with pytest.raises(HarnessError, match="unknown preset 'adamerging'; valid: zero-shot, "):
        build_config({"preset": "adamerging"})


def test_fusionbench_variants_resolve_to_a_fixed_scale():
    p = plan(build_config({"preset": "ties-fusionbench"}))
    assert p.config.task_options["transform"] == "ties:merge=sum"
    assert (p.searcher_options.lo, p.searcher_options.hi, p.searcher_options.points) == (0.3, 0.3, 1)
    p = plan(build_config({"preset": "iso-c-fusionbench"}))
    assert p.config.task_options["transform"] == "iso:conv=other,other=mean"


def test_readme_shows_the_preset_table():
    from harness.leaderboard import markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown(pd.DataFrame(table())) in readme
