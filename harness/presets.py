"""Named presets: published methods mapped onto the harness (``run --preset NAME``).

A preset is the lowest layer of a run's configuration: a ``--config`` file and explicit flags
override it (``--preset adamerging-layer --budget 100``; ``-s``/``-t`` options are merged, the
explicit ones winning). A preset names nothing the harness does not record: the run's record
holds the resolved task, searcher, space, budget and options, so two ways of asking for the
same run are the same run. ``python -m harness presets [NAME]`` lists them (docs/reference/presets.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.api import HarnessError


@dataclass(frozen=True)
class Preset:
    method: str
    paper: str
    task: str
    searcher: str
    space: str | None = None
    budget: int | None = None
    searcher_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def flags(self) -> str:
        """The equivalent command-line flags."""
        parts = [f"--task {self.task}", f"--searcher {self.searcher}"]
        if self.space:
            parts.append(f"--space {self.space}")
        if self.budget:
            parts.append(f"--budget {self.budget}")
        parts += [f"-t {k}={v}" for k, v in self.task_options.items()]
        parts += [f"-s {k}={v}" for k, v in self.searcher_options.items()]
        return " ".join(parts)


_FB = "FusionBench's defaults (its fixed scaling factor, no α search)"
_ADA = "entropy on unlabelled test inputs; start: best of 11 isotropic points (the paper: λ = 0.3)"

PRESETS: dict[str, Preset] = {p_name: p for p_name, p in [
    ("zero-shot", Preset("Zero-shot (pre-trained model)", "—", "addition", "zero-shot")),
    ("task-arithmetic", Preset("Task arithmetic", "Ilharco et al. 2023", "addition", "task-arithmetic",
                               note="α on linspace(0, 1, 21) by validation loss")),
    ("ties", Preset("TIES-Merging", "Yadav et al. 2023", "addition", "ties",
                    note="k = 20 %, disjoint mean, α on linspace(0, 2, 21)")),
    ("ties-fusionbench", Preset("TIES-Merging (FusionBench)", "Yadav et al. 2023", "addition", "ties",
                                searcher_options={"lo": 0.3, "hi": 0.3, "points": 1},
                                task_options={"transform": "ties:merge=sum,exclude=^proj$"},
                                note=_FB + "; the visual projection, absent from CLIPVisionModel checkpoints, left out")),
    ("dare", Preset("DARE + task arithmetic", "Yu et al. 2024", "addition", "dare",
                    note="p = 0.5, rescaled; masks seeded by the run")),
    ("dare-fusionbench", Preset("DARE + task arithmetic (FusionBench)", "Yu et al. 2024", "addition", "dare",
                                searcher_options={"lo": 0.3, "hi": 0.3, "points": 1}, note=_FB)),
    ("iso-c", Preset("Iso-C", "Marczak et al. 2025", "addition", "iso", note="α on linspace(0, 2, 21)")),
    ("iso-c-fusionbench", Preset("Iso-C (FusionBench)", "Marczak et al. 2025", "addition", "iso",
                                 searcher_options={"lo": 1.0, "hi": 1.0, "points": 1},
                                 task_options={"transform": "iso:conv=other,other=mean"}, note=_FB)),
    ("iso-cts", Preset("Iso-CTS", "Marczak et al. 2025", "addition", "iso-cts",
                       note="common subspace 0.8 of each rank, α on linspace(0, 2, 21)")),
    ("iso-cts-fusionbench", Preset("Iso-CTS (FusionBench)", "Marczak et al. 2025", "addition", "iso-cts",
                                   searcher_options={"lo": 1.0, "hi": 1.0, "points": 1},
                                   task_options={"transform": "iso-cts:conv=other"}, note=_FB)),
    ("tsvm", Preset("TSV-M", "Gargiulo et al. 2025", "addition", "tsvm",
                    note="1/T of each rank per task, α on linspace(0, 2, 21)")),
    ("tsvm-fusionbench", Preset("TSV-M (FusionBench)", "Gargiulo et al. 2025", "addition", "tsvm",
                                searcher_options={"lo": 1.0, "hi": 1.0, "points": 1},
                                task_options={"transform": "tsvm:conv=other"}, note=_FB)),
    ("consensus", Preset("Consensus task arithmetic (TALL masks)", "Wang et al. 2024", "addition", "consensus",
                         note="λ = 0.6, k = 2, α on linspace(0, 1, 21)")),
    ("cart", Preset("CART", "Choi et al. 2024", "addition", "cart",
                    note="rank 8 % of each centred matrix, λ on linspace(0, 2, 21), the average at 1")),
    ("wudi", Preset("WUDI", "Cheng et al. 2025", "addition", "wudi", note="300 Adam steps at 1e-5, α on linspace(0, 2, 21)")),
    ("wudi-fusionbench", Preset("WUDI (FusionBench)", "Cheng et al. 2025", "addition", "wudi",
                                searcher_options={"lo": 1.0, "hi": 1.0, "points": 1},
                                task_options={"transform": "wudi:conv=other,steps=400"},
                                note=_FB + "; its configuration's 400 steps")),
    ("adamerging-task", Preset("Task-wise AdaMerging", "Yang et al. 2024", "addition", "gradient", "per_task", 500,
                               {"warm": 11}, {"objective": "entropy"}, note=_ADA)),
    ("adamerging-layer", Preset("Layer-wise AdaMerging", "Yang et al. 2024", "addition", "gradient", "per_layer", 500,
                                {"warm": 11}, {"objective": "entropy"}, note=_ADA)),
    ("adamerging++-layer", Preset("Layer-wise AdaMerging++", "Yang et al. 2024", "addition", "gradient", "per_layer",
                                  500, {"warm": 11}, {"objective": "entropy", "transform": "ties"},
                                  note="AdaMerging over TIES vectors")),
    ("norm-tuning", Preset("Norm-layer tuning (Tent's affine parameters, LN tuning in aTLAS Table 3)",
                           "Wang et al. 2021", "tta", "gradient", "norms", 200, {"lr": 0.001, "weight_decay": 0.0},
                           {"objective": "entropy"},
                           note="entropy on unlabelled test images; normalisation statistics stay the pre-trained ones")),
    ("sar", Preset("SAR", "Niu et al. 2023", "tta", "sar", "norms", 200, task_options={"objective": "entropy",
                                                                                     "reliable": 0.4},
                   note="SAM steps (ρ 0.05) on the entropy of reliable samples (< 0.4 ln C), reset below 0.2")),
    ("tip-adapter", Preset("Tip-Adapter-F on the pre-trained model", "Zhang et al. 2022", "few_shot", "zero-shot",
                           "per_task", 1, task_options={"adapter": "tip-f"},
                           note="cache of the shots' features (keys trained 300 full-batch AdamW steps, lr 1e-3), α 1, β 5.5")),
    ("lpp", Preset("LP++ on the pre-trained model", "Huang et al. 2024", "few_shot", "zero-shot", "per_task", 1,
                   task_options={"adapter": "lpp"},
                   note="class-mean prototypes blended per class with the head's logits; full-batch AdamW")),
    ("atlas-tip", Preset("aTLAS with Tip-Adapter-F, learned jointly (Table 9)", "Zhang et al. 2024", "few_shot",
                         "gradient", "per_block", None, {"lr": 0.1, "schedule": "cosine"},
                         {"adapter": "tip-f", "adapter_mode": "joint"})),
    ("atlas-lpp", Preset("aTLAS with LP++, learned jointly (Table 9)", "Zhang et al. 2024", "few_shot", "gradient",
                         "per_block", None, {"lr": 0.1, "schedule": "cosine"}, {"adapter": "lpp", "adapter_mode": "joint"})),
    ("lora", Preset("LoRA fine-tuning, rank 16 (the PEFT baseline of Table 17)", "Hu et al. 2022", "few_shot",
                    "gradient", "lora:16", None, {"lr": 0.01, "schedule": "cosine"},
                    note="every weight matrix of the tail; -t fraction=F trains on a share of the train split")),
    ("atlas-linear", Preset("aTLAS on linearised task vectors (Tables 1-2, Lin.)", "Zhang et al. 2024", "addition",
                            "gradient", "per_block", 300, {"lr": 0.01}, {"linearize": True},
                            note="the first-order model at θ0; give checkpoints from finetune --mode linear")),
    ("atlas", Preset("aTLAS task addition", "Zhang et al. 2024", "addition", "gradient", "per_block", 300,
                     {"lr": 0.01}, note="the paper's method: per-block coefficients, validation cross-entropy")),
    ("atlas-ties", Preset("aTLAS over TIES vectors", "this harness", "addition", "gradient", "per_block", 300,
                          {"lr": 0.01}, {"transform": "ties"})),
    ("atlas-blackbox", Preset("aTLAS, gradient-free, over the Iso-C vector", "this harness", "addition", "nevergrad",
                              "per_block", 300, task_options={"transform": "iso", "search_n": 128},
                              note="the best black-box setting measured here at gradient's wall time: "
                                   "+0.02 points over gradient aTLAS (3 seeds)")),
    ("atlas-dfo", Preset("aTLAS, raw task vectors per block, derivative-free Gauss-Newton",
                         "this harness", "addition", "dfo-gn", "per_block", 725, {"inner_steps": 100},
                         task_options={"search_n": 128},
                         note="forward passes only: 4 rounds of one probe per coefficient and a trust-region step "
                              "on the model of the logits (results page blackbox-dfo)")),
    ("atlas-blackbox-few-shot", Preset("aTLAS few-shot, derivative-free Gauss-Newton, calibrated head",
                                       "this harness", "few_shot", "dfo-gn", "per_block", 406,
                                       {"radius": 0.2, "max_radius": 0.2, "coarse_rounds": 3},
                                       task_options={"calibrate": True},
                                       note="forward passes only: 3 rounds over task vector × layer groups, then 2 over "
                                            "every coefficient; −0.32 points from gradient aTLAS at 0.96× its wall time "
                                            "(k = 1..16, 2 targets, 6 seeds; results page blackbox-dfo-few-shot-coarse)")),
    ("atlas-negation", Preset("aTLAS task negation", "Zhang et al. 2024", "negation", "gradient", "per_block", 300,
                              {"lr": 0.01})),
    ("atlas-few-shot", Preset("aTLAS few-shot recognition", "Zhang et al. 2024", "few_shot", "gradient",
                              "per_block")),
    ("atlas-tta", Preset("aTLAS test-time adaptation (UFM)", "Zhang et al. 2024", "tta", "gradient", "per_block",
                         task_options={"objective": "ufm"})),
    # The paper's own protocols, for its suites and data (-t suite=... --data-root DIR): the
    # hyper-parameters of its released code; the comparable figure is in harness.data.paper.
    ("paper-table1-atlas", Preset("aTLAS task negation, the paper's protocol (Table 1)", "Zhang et al. 2024",
                                  "negation", "gradient", "per_block", None, {"weight_decay": 0.1, "clip": 1.0},
                                  {"control": "ImageNet", "control_split": "val",
                                   "floor": 0.95, "batch_size": 64, "search_n": 5000},
                                  note="one target at a time (-t target=NAME -t extra_data=ImageNet), ImageNet's "
                                       "validation split as control (kept at "
                                       ">= 95 % of zero-shot); lr and epochs per target are the paper's Table 6 "
                                       "(benchmarks/paper-table1.toml)")),
    ("paper-table2-atlas", Preset("aTLAS task addition, the paper's protocol (Table 2)", "Zhang et al. 2024",
                                  "addition", "gradient", "per_block", 500,
                                  {"lr": 1e-3, "weight_decay": 0.1, "clip": 1.0, "validate_every": 24},
                                  {"batch_size": 16, "search_n": 5000},
                                  note="16 images per task per step, 20 epochs of 24 steps (the smallest ta8 "
                                       "validation split, DTD's 376 images), the best epoch kept; selected by "
                                       "validation cross-entropy, where the paper uses mean normalised accuracy")),
    ("paper-table2-ta", Preset("Task arithmetic, the paper's search (Table 2)", "Ilharco et al. 2023",
                               "addition", "task-arithmetic", "per_task", task_options={"search_n": 5000},
                               note="α on linspace(0, 1, 21), chosen on the whole validation splits")),
    ("paper-table3-ufm", Preset("aTLAS test-time adaptation with UFM (Table 3)", "Zhang et al. 2024", "tta",
                                "gradient", "per_block", None, {"lr": 1e-3, "schedule": "cosine"},
                                {"objective": "ufm"}, note="one target at a time over the other data sets' "
                                "task vectors; unlabelled test split; lr 1e-3, cosine")),
    ("paper-table9-few-shot", Preset("aTLAS few-shot (Table 9)", "Zhang et al. 2024", "few_shot", "gradient",
                                     "per_block", None, {"lr": 0.1, "schedule": "cosine"},
                                     note="k shots per class (-t shots=1,2,4,8,16) of the target's train part, "
                                          "the other data sets' task vectors; lr 0.1, cosine")),
    ("paper-table16-iso", Preset("Gradient-free few-shot, isotropic (Table 16)", "Zhang et al. 2024", "few_shot",
                                 "nevergrad", "per_task", 50, {"optimizer": "NGOpt"}, {"bound": 1.5},
                                 note="the released code's nevergrad: NGOpt, budget 50, box ±1.5, start 0")),
    ("paper-table16-aniso", Preset("Gradient-free few-shot, anisotropic (Table 16)", "Zhang et al. 2024",
                                   "few_shot", "nevergrad", "per_block", 50, {"optimizer": "NGOpt"}, {"bound": 1.5},
                                   note="as paper-table16-iso, one coefficient per block")),
]}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise HarnessError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)} (python -m harness presets)")
    return PRESETS[name]


def apply(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (config keys from a file and flags) over the preset's: theirs win, options merge."""
    p = get(name)
    out = {"task": p.task, "searcher": p.searcher}
    if p.space:
        out["space"] = p.space
    if p.budget:
        out["budget"] = p.budget
    for k, v in values.items():
        if k not in ("searcher_options", "task_options"):
            out[k] = v
    out["searcher_options"] = {**p.searcher_options, **values.get("searcher_options", {})}
    out["task_options"] = {**p.task_options, **values.get("task_options", {})}
    return out
