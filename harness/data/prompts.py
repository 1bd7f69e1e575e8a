"""Class names and CLIP prompt templates of the benchmark's data sets, as data with provenance.

A zero-shot head is built by formatting every template with every class name (TV and FusionBench
both average the normalised text embeddings over the templates). This module holds those lists
for the 22 data sets of the aTLAS pool and the 7 FusionBench-only tasks of TALL14/TALL20, each
with the place it was taken from. The literals live in :mod:`harness.data._prompt_lists`.

Variants (``VARIANTS``):

- ``"atlas"`` (default): the lists of the paper's code, mlfoundations/task_vectors (TV) and
  fredzzhang/atlas (AT). They are the ones AT's checkpoints and committed accuracies were built
  with.
- ``"fusionbench"``: the lists of ``fusion_bench==0.2.33`` (FB). They equal the atlas ones for
  the 8 standard tasks, CIFAR10, STL10 and Food101, and differ for CUB200 (names keep their
  underscores; two templates instead of one), ImageNet (WordNet synset strings instead of the
  OpenAI clean names), OxfordIIITPet (raw lower-case file names instead of Title Case),
  Flowers102 (3 names) and CIFAR100 (FB's ``"cra"`` at index 26).

  ImageNet: FB builds its templates as ``[lambda c: prompt.format(c) for prompt in
  imagenet_templates]`` (``imagenet.py:1101``). Every lambda reads ``prompt`` when it is called,
  after the loop has ended, so all 80 render as the last one, ``'a tattoo of the {}.'``. This
  module returns the 80 *intended* templates (``imagenet_templates``, ``imagenet.py:1015-1096``,
  the same 80 as TV/AT), not the collapsed list; a run that must reproduce FB's numbers exactly
  has to repeat ``'a tattoo of the {}.'`` itself.

Data sets that FB has no list for (Caltech101, Caltech256, FGVCAircraft, PascalVOC, Country211,
UCF101) give the atlas lists under ``"fusionbench"``; the FB-only tasks (pcam, fer2013,
fashion_mnist, emnist_letters, emnist_mnist, kmnist, rendered-sst2) give FB's lists under both
variants. The provenance says so in each case.

``classes`` is None where the reference code reads the names from the data on disk and no fixed
list could be checked against that derivation (Caltech101, Caltech256, FGVCAircraft, UCF101); the
provenance then says how the reader must derive them. Where a fixed list equals the reference
derivation it is stored, and the provenance names both.

A name ending in ``Val`` (``CarsVal``) gives its base set's lists, as TV's ``get_templates`` does:
train, val and test share one head.

Example:
    >>> p = prompts("GTSRB")
    >>> len(p.classes), p.templates[0].format(p.classes[14])
    (43, 'a zoomed in photo of a "stop" traffic sign.')
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from harness.api import HarnessError

VARIANTS: tuple[str, ...] = ("atlas", "fusionbench")

_TV = "mlfoundations/task_vectors@826a64c67082fab0f40628233287948f0f8d7fa3:src/datasets/"
_AT = "fredzzhang/atlas@557d7fbd61a28fc85f8463b2fd522706d8e4e980:src/datasets/"
_FB = "fusion_bench==0.2.33:fusion_bench/tasks/clip_classification/"

# aTLAS name -> FB module, for the data sets both have.
FB_MODULES: dict[str, str] = {
    "Cars": "stanford_cars", "DTD": "dtd", "EuroSAT": "eurosat", "GTSRB": "gtsrb",
    "MNIST": "mnist", "RESISC45": "resisc45", "SUN397": "sun397", "SVHN": "svhn",
    "CIFAR10": "cifar10", "CIFAR100": "cifar100", "ImageNet": "imagenet", "STL10": "stl10",
    "Food101": "food101", "Flowers102": "flower102", "OxfordIIITPet": "oxford_iiit_pet",
    "CUB200": "cub_200_2011",
    # FB-only tasks, under FB's task keys.
    "pcam": "pcam", "fer2013": "fer2013", "fashion_mnist": "fashion_mnist",
    "emnist_letters": "emnist_letters", "emnist_mnist": "emnist_mnist", "kmnist": "kmnist",
    "rendered-sst2": "rendered_sst2",
}


@dataclass(frozen=True)
class Prompts:
    """One data set's class names and templates.

    Attributes:
        classes: class names in label order, or None where the reader derives them from the data
            on disk (the provenance says how).
        templates: format strings, each with ``'{}'`` exactly once for the class name.
        provenance: where the class names and the templates come from.
    """

    classes: tuple[str, ...] | None
    templates: tuple[str, ...]
    provenance: str

    def __post_init__(self):
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise HarnessError(f"templates must each contain '{{}}' exactly once, got {bad}")


def _tv_at(tv_lines: str, at_lines: str, var: str) -> str:
    return (f"{_TV}templates.py:{tv_lines} ({var}; the same list at "
            f"{_AT}templates.py:{at_lines})")


def _at(lines: str, var: str) -> str:
    return f"{_AT}templates.py:{lines} ({var})"


def _p(classes, templates, classes_from: str, templates_from: str) -> Prompts:
    return Prompts(None if classes is None else tuple(classes), tuple(templates),
                   f"classes: {classes_from}; templates: {templates_from}")


def _title_pets(raw: str) -> str:
    # torchvision's OxfordIIITPet naming, copied into AT oxford_pets.py:123-132.
    return " ".join(part.title() for part in raw.split("_"))


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, dict[str, Prompts]]:
    from harness.data import _prompt_lists as L

    fb_same = " (FB's list is equal: see the fusionbench variant)"
    atlas: dict[str, Prompts] = {
        "Cars": _p(L.CARS_CLASSES, L.CARS_TEMPLATES,
                   f"{_FB}stanford_cars.py:2-197, the cars_meta.mat order that TV reads at "
                   f"{_TV}cars.py:78,152-155 (equal by FB evaluating TV's Cars head on its data; "
                   "not compared with the .mat file)",
                   _tv_at("1-10", "12-21", "cars_template")),
        "DTD": _p(L.DTD_CLASSES, L.DTD_TEMPLATES,
                  f"{_FB}dtd.py:1-49, equal to TV's sorted dtd/train folder names, '_' -> ' ' "
                  f"({_TV}dtd.py:31-34)",
                  _tv_at("54-63", "65-74", "dtd_template")),
        "EuroSAT": _p(L.EUROSAT_CLASSES, L.EUROSAT_TEMPLATES,
                      f"{_TV}eurosat.py:42-57 (sorted EuroSAT_splits folders mapped to the OpenAI "
                      "names)" + fb_same,
                      _tv_at("65-69", "76-80", "eurosat_template")),
        "GTSRB": _p(L.GTSRB_CLASSES, L.GTSRB_TEMPLATES,
                    f"{_TV}gtsrb.py:161-205 (index = ClassId)" + fb_same,
                    _tv_at("75-79", "86-90", "gtsrb_template")),
        "MNIST": _p(L.DIGITS, L.DIGIT_TEMPLATES, f"{_TV}mnist.py:41" + fb_same,
                    _tv_at("81-83", "92-94", "mnist_template")),
        "RESISC45": _p(L.RESISC45_CLASSES, L.RESISC45_TEMPLATES,
                       f"{_TV}resisc45.py:202-248 with '_' -> ' ' as at resisc45.py:304" + fb_same,
                       _tv_at("168-187", "179-198", "resisc45_template")),
        "SUN397": _p(L.SUN397_CLASSES, L.SUN397_TEMPLATES,
                     f"{_FB}sun397.py:2-398, equal to TV's names over the sorted sun397/train "
                     f"folders, [2:] and '_' -> ' ' ({_TV}sun397.py:30-32)",
                     _tv_at("194-197", "205-208", "sun397_template")),
        "SVHN": _p(L.DIGITS, L.DIGIT_TEMPLATES, f"{_TV}svhn.py:45" + fb_same,
                   _tv_at("199-201", "210-212", "svhn_template")),
        "CIFAR10": _p(L.CIFAR10_CLASSES, L.CIFAR_TEMPLATES,
                      f"torchvision CIFAR10.classes ({_TV}cifar10.py:35; the same list is written "
                      "out at cifar10.py:10)" + fb_same,
                      _tv_at("12-31", "23-42", "cifar10_template")),
        "CIFAR100": _p(L.CIFAR100_CLASSES_FB[:26] + ("crab",) + L.CIFAR100_CLASSES_FB[27:],
                       L.CIFAR_TEMPLATES,
                       f"torchvision CIFAR100.classes, i.e. the CIFAR-100 meta file's "
                       f"fine_label_names with underscores kept ({_TV}cifar100.py:28); written "
                       f"here as {_FB}cifar100.py:1-102 (fine_label) with index 26 'cra' -> "
                       "'crab'. The meta file itself was not read: 'crab' at index 26 is the "
                       "published CIFAR-100 label order",
                       _tv_at("33-52", "44-63", "cifar100_template")),
        "ImageNet": _p(L.IMAGENET_CLASSES, L.IMAGENET_TEMPLATES,
                       f"{_TV}imagenet.py:8-174 (OpenAI clean names; the same list at "
                       f"{_AT}imagenet.py:8-174)",
                       _tv_at("85-166", "96-177", "imagenet_template")),
        "STL10": _p(L.STL10_CLASSES, L.STL10_TEMPLATES,
                    f"torchvision STL10.classes ({_AT}stl10.py:41, a copy of TV's); written here "
                    f"as {_FB}stl10.py:1-12",
                    _tv_at("189-192", "200-203", "stl10_template")),
        "Food101": _p(L.FOOD101_CLASSES, L.FOOD101_TEMPLATES,
                      f"{_AT}food.py:40,95 derives sorted(meta/train.json keys) with '_' -> ' '; "
                      f"written here as {_FB}food101.py:1-103 (sorted, 101 names; not compared "
                      "with the meta file)",
                      _tv_at("71-73", "82-84", "food101_template")),
        "Caltech101": _p(None, L.CALTECH_TEMPLATES,
                         f"derived from disk ({_AT}caltech.py:81,137-140): the sorted folder names "
                         "of caltech101/101_ObjectCategories without BACKGROUND_Google, each "
                         "n.split('.')[-1].replace('-', ' ').replace(' 101', '')",
                         _at("267-302", "caltech101_template")),
        "Caltech256": _p(None, L.CALTECH_TEMPLATES,
                         f"derived from disk ({_AT}caltech.py:50,273-275): the sorted folder names "
                         "of caltech256/256_ObjectCategories (NNN.name, 257 with clutter), each "
                         "n.split('.')[-1].replace('-', ' ').replace(' 101', '')",
                         _at("304-339", "caltech256_template")),
        "FGVCAircraft": _p(None, L.FGVC_TEMPLATES,
                           f"derived from disk ({_AT}fgvc_aircraft.py:42,130): the stripped lines "
                           "of fgvc-aircraft-2013b/data/variants.txt",
                           _at("341-344", "fgvc_template")),
        "Flowers102": _p(L.FLOWERS102_CLASSES, L.FLOWERS102_TEMPLATES,
                         f"{_AT}flowers.py:45-148",
                         _at("346-348", "flowers102_template")),
        "OxfordIIITPet": _p(tuple(_title_pets(c) for c in L.OXFORD_PETS_CLASSES_FB),
                            L.PET_TEMPLATES,
                            f"torchvision's naming ({_AT}oxford_pets.py:41,123-132: the image-id "
                            "prefix in label order, ' '.join(part.title() for part in "
                            f"raw.split('_'))) applied to {_FB}oxford_iiit_pet.py:1-39",
                            _at("350-352", "pet_template")),
        "CUB200": _p(tuple(c.replace("_", " ") for c in L.CUB200_CLASSES_FB), L.CUB200_TEMPLATES,
                     f"AT's naming ({_AT}cub2011.py:34,70-79: CUB_200_2011/classes.txt name after "
                     f"the '.', '_' -> ' ') applied to {_FB}cub_200_2011.py:1-204 (not compared "
                     "with classes.txt)",
                     _at("354-356", "cub200_template")),
        "PascalVOC": _p(L.PASCALVOC_CLASSES, L.VOC_TEMPLATES, f"{_AT}voc2007.py:275-279",
                        _at("358-360", "voc2007_template")),
        "Country211": _p(L.COUNTRY211_CLASSES, L.COUNTRY211_TEMPLATES,
                         f"{_AT}country211.py:36-248 (sorted ISO-code order)",
                         _at("362-368", "country211_template")),
        "UCF101": _p(None, L.UCF101_TEMPLATES,
                     f"derived from disk ({_AT}ucf101.py:36,61,75-80): the class names (third "
                     "field) of UCF-101-midframes/split_zhou_UCF101.json's 'train' entries in "
                     "order of first appearance (labels come from the second field; AT assumes "
                     "the two orders agree)",
                     _at("215-265", "ucf101_template")),
    }

    fb_only = {
        "pcam": (L.PCAM_CLASSES, "1", L.PCAM_TEMPLATES, "3-5"),
        "fer2013": (L.FER2013_CLASSES, "1-9", L.FER2013_TEMPLATES, "11-18"),
        "fashion_mnist": (L.FASHION_MNIST_CLASSES, "1-13", L.FASHION_MNIST_TEMPLATES, "15-18"),
        "emnist_letters": (L.EMNIST_LETTERS_CLASSES, "1-30", L.EMNIST_LETTERS_TEMPLATES, "31"),
        "emnist_mnist": (L.DIGITS, "2", L.DIGIT_TEMPLATES, "3-5"),
        "kmnist": (L.KMNIST_CLASSES, "1-13", L.KMNIST_TEMPLATES, "15-17"),
        "rendered-sst2": (L.RENDERED_SST2_CLASSES, "1", L.RENDERED_SST2_TEMPLATES, "3"),
    }
    fusionbench: dict[str, Prompts] = {}
    for name, (classes, c_lines, templates, t_lines) in fb_only.items():
        path = f"{_FB}{FB_MODULES[name]}.py"
        fusionbench[name] = _p(classes, templates, f"{path}:{c_lines}", f"{path}:{t_lines}")
        atlas[name] = Prompts(classes, templates, "TV and AT have no list for this task; "
                              "FusionBench's is used. " + fusionbench[name].provenance)

    def fb(name: str, classes, c_lines: str, templates, t_lines: str, note: str = "") -> Prompts:
        path = f"{_FB}{FB_MODULES[name]}.py"
        return _p(classes, templates, f"{path}:{c_lines}{note}", f"{path}:{t_lines}")

    # For these FB's lists equal the atlas ones (values checked by tests/test_prompts.py).
    for name, c_lines, t_lines in [
            ("Cars", "1-198", "200-209"), ("DTD", "1-49", "51-60"), ("EuroSAT", "1-12", "14-18"),
            ("GTSRB", "1-45", "47-51"), ("MNIST", "1", "3-5"), ("RESISC45", "1-47", "49-68"),
            ("SUN397", "1-399", "401-404"), ("SVHN", "1", "3-5"), ("CIFAR10", "1-12", "14-33"),
            ("STL10", "1-12", "14-17"), ("Food101", "1-103", "105")]:
        fusionbench[name] = fb(name, atlas[name].classes, c_lines, atlas[name].templates, t_lines)
    fusionbench["CIFAR100"] = fb("CIFAR100", L.CIFAR100_CLASSES_FB, "1-102 (fine_label)",
                                 L.CIFAR_TEMPLATES, "127-146")
    fusionbench["ImageNet"] = fb("ImageNet", L.IMAGENET_CLASSES_FB, "7-1013 (synset strings)",
                                 L.IMAGENET_TEMPLATES, "1015-1096 (imagenet_templates, the 80 "
                                 "intended templates; FB's own `templates` at line 1101 collapses "
                                 "them into 80 copies of 'a tattoo of the {}.')")
    fusionbench["Flowers102"] = fb("Flowers102", L.FLOWERS102_CLASSES_FB, "1-104",
                                   L.FLOWERS102_TEMPLATES, "106")
    fusionbench["OxfordIIITPet"] = fb("OxfordIIITPet", L.OXFORD_PETS_CLASSES_FB, "1-39",
                                      L.PET_TEMPLATES, "41")
    fusionbench["CUB200"] = fb("CUB200", L.CUB200_CLASSES_FB, "1-204", L.CUB200_TEMPLATES_FB,
                               "205-208")
    for name, entry in atlas.items():
        if name not in fusionbench:
            fusionbench[name] = Prompts(entry.classes, entry.templates,
                                        "fusion_bench==0.2.33 has no list for this data set; "
                                        "the atlas lists are used. " + entry.provenance)
    return {"atlas": atlas, "fusionbench": fusionbench}


def names() -> list[str]:
    """Every data set key: the 22 aTLAS names, then the FusionBench-only task keys."""
    return list(_table()["atlas"])


def prompts(name: str, variant: str = "atlas") -> Prompts:
    """The class names and templates of data set ``name`` (``names()``; a ``Val`` suffix is
    ignored) in ``variant`` (``VARIANTS``). Unknown names and variants are a HarnessError."""
    if variant not in VARIANTS:
        raise HarnessError(f"unknown prompt variant '{variant}'; valid variants: "
                           f"{', '.join(VARIANTS)}")
    table = _table()[variant]
    if name not in table and name.endswith("Val") and name[:-3] in table:
        name = name[:-3]
    if name not in table:
        raise HarnessError(f"no class names or templates for data set '{name}'; valid names: "
                           f"{', '.join(table)}")
    return table[name]
