"""The field's benchmark data sets and suites: names in both conventions, split sizes, suite order.

Two naming conventions meet here. The aTLAS / task_vectors code names data sets in CamelCase
(``Cars``, ``SUN397``); FusionBench names them by key (``stanford-cars``, ``sun397``). Every data
set has one :class:`Spec` that knows both; :func:`spec` accepts either (case-insensitive), and a
suite lists its tasks in its own convention, which is the name results are recorded under.

Split sizes are the paper's Table 5 (arXiv 2407.02880): ``train`` is the part of the train split
left after the validation split is taken out, ``val`` the validation split, ``test`` the test
split. Six data sets ship their own validation split (``own_val``) and use it instead.

Suites (FusionBench 0.2.33 ``fusion_bench_config/taskpool/CLIPVisionModelTaskPool/
clip-vit-classification_{TA8,TALL14,TALL20}.yaml``; aTLAS ``src/learn_few_shots.py:37-41``):

- ``ta8``: sun397, stanford-cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd (FusionBench order)
- ``ta8-atlas``: the same eight in the aTLAS code's order and names (Cars … SVHN)
- ``tall14``: ``ta8`` + oxford_flowers102, pcam, fer2013, oxford-iiit-pet, stl10, cifar100
- ``tall20``: ``tall14`` + cifar10, food101, fashion_mnist, emnist_letters, kmnist, rendered-sst2
- ``atlas22``: the paper's 22 data sets in its code's order
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import HarnessError


@dataclass(frozen=True)
class Spec:
    """One benchmark data set.

    Attributes:
        name: the aTLAS / task_vectors name (``Cars``); FusionBench-only sets use their key.
        fb: the FusionBench key (``stanford-cars``), None where FusionBench has no such task.
        n_classes: the number of classes.
        sizes: ``(train, val, test)`` after the validation split (paper Table 5), None if unknown.
        own_val: the data set ships its own validation split (no split of train is made).
        hf: the Hugging Face dataset id FusionBench downloads, None where it has none.
    """

    name: str
    fb: str | None
    n_classes: int
    sizes: tuple[int, int, int] | None
    own_val: bool = False
    hf: str | None = None

    @property
    def raw_train(self) -> int | None:
        """Images in the whole train split (train part + validation part, unless ``own_val``)."""
        if self.sizes is None:
            return None
        return self.sizes[0] if self.own_val else self.sizes[0] + self.sizes[1]


_SPECS = (
    Spec("Cars", "stanford-cars", 196, (7330, 814, 8041), hf="tanganke/stanford_cars"),
    Spec("DTD", "dtd", 47, (3384, 376, 1880), hf="tanganke/dtd"),
    Spec("EuroSAT", "eurosat", 10, (21600, 2700, 2700), own_val=True, hf="tanganke/eurosat"),
    Spec("GTSRB", "gtsrb", 43, (23976, 2664, 12630), hf="tanganke/gtsrb"),
    Spec("MNIST", "mnist", 10, (55000, 5000, 10000), hf="ylecun/mnist"),
    Spec("RESISC45", "resisc45", 45, (17010, 1890, 6300), hf="tanganke/resisc45"),
    Spec("SUN397", "sun397", 397, (17865, 1985, 19850), hf="tanganke/sun397"),
    Spec("SVHN", "svhn", 10, (68257, 5000, 26032), hf="ufldl-stanford/svhn"),
    Spec("CIFAR10", "cifar10", 10, (45000, 5000, 10000), hf="tanganke/cifar10"),
    Spec("CIFAR100", "cifar100", 100, (45000, 5000, 10000), hf="tanganke/cifar100"),
    Spec("ImageNet", None, 1000, (1276167, 5000, 50000)),
    Spec("STL10", "stl10", 10, (4500, 500, 8000), hf="tanganke/stl10"),
    Spec("Food101", "food101", 101, (70750, 5000, 25250), hf="ethz/food101"),
    Spec("Caltech101", None, 101, (6247, 694, 1736)),
    Spec("Caltech256", None, 257, (22037, 2448, 6122)),
    Spec("FGVCAircraft", None, 100, (3334, 3333, 3333), own_val=True),
    Spec("Flowers102", "oxford_flowers102", 102, (1020, 1020, 6149), own_val=True,
         hf="dpdl-benchmark/oxford_flowers102"),
    Spec("OxfordIIITPet", "oxford-iiit-pet", 37, (3312, 368, 3669), hf="timm/oxford-iiit-pet"),
    Spec("CUB200", None, 200, (5395, 599, 5794)),
    Spec("PascalVOC", None, 20, (7844, 7818, 14976), own_val=True),
    Spec("Country211", None, 211, (31650, 10550, 21100), own_val=True),
    Spec("UCF101", None, 101, (7639, 1898, 3783), own_val=True),
    # FusionBench-only tasks (TALL14 / TALL20): no aTLAS name, sizes not specified here.
    Spec("pcam", "pcam", 2, None, hf="1aurent/PatchCamelyon"),
    Spec("fer2013", "fer2013", 7, None, hf="clip-benchmark/wds_fer2013"),
    Spec("fashion_mnist", "fashion_mnist", 10, None, hf="zalando-datasets/fashion_mnist"),
    Spec("emnist_letters", "emnist_letters", 26, None, hf="tanganke/emnist_letters"),
    Spec("kmnist", "kmnist", 10, None, hf="tanganke/kmnist"),
    Spec("rendered-sst2", "rendered-sst2", 2, None, hf="nateraw/rendered-sst2"),
)
# Caltech101's Table 5 row gives the train split before the validation split is taken out
# (6,941); the train part above is 6,941 - 694 so that train + val is the raw train split.

SPECS: dict[str, Spec] = {s.name: s for s in _SPECS}

_TA8 = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
_TALL14 = _TA8 + ("oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
_TALL20 = _TALL14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
_ATLAS22 = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN", "CIFAR10",
            "CIFAR100", "ImageNet", "STL10", "Food101", "Caltech101", "Caltech256", "FGVCAircraft",
            "Flowers102", "OxfordIIITPet", "CUB200", "PascalVOC", "Country211", "UCF101")

SUITES: dict[str, tuple[str, ...]] = {
    "ta8": _TA8,
    "ta8-atlas": _ATLAS22[:8],
    "tall14": _TALL14,
    "tall20": _TALL20,
    "atlas22": _ATLAS22,
}

_BY_KEY: dict[str, Spec] = {}
for _s in _SPECS:
    for _k in {_s.name, _s.fb} - {None}:
        _BY_KEY[_k.lower()] = _s
# Other spellings people use for the same sets (FusionBench accepts these, and hub ids).
for _alias, _name in {"stanford_cars": "Cars", "tanganke/stanford_cars": "Cars", "cars": "Cars",
                      "flowers102": "Flowers102", "oxford_iiit_pet": "OxfordIIITPet",
                      "oxfordpets": "OxfordIIITPet", "cub-200-2011": "CUB200", "cub200": "CUB200",
                      "imagenet": "ImageNet", "rendered_sst2": "rendered-sst2"}.items():
    _BY_KEY[_alias] = SPECS[_name]


def spec(name: str) -> Spec | None:
    """The benchmark data set called ``name`` in either convention (case-insensitive), else None."""
    return _BY_KEY.get(name.strip().lower())


def suite(name: str) -> list[str]:
    """A suite's task names, in its order and its own naming convention."""
    if name not in SUITES:
        raise HarnessError(f"unknown suite '{name}'; valid: {', '.join(SUITES)}")
    return list(SUITES[name])


def val_size(n: int, rule: str = "atlas") -> int:
    """Size of the validation split taken out of a train split of ``n`` images.

    ``atlas`` (task_vectors ``split_train_into_train_val``): ``min(int(0.1 n), 5000)``;
    ``fusionbench`` (``fusion_bench.utils.data.train_validation_split``): ``int(0.1 n)``.
    """
    if rule == "atlas":
        return min(int(0.1 * n), 5000)
    if rule == "fusionbench":
        return int(0.1 * n)
    raise HarnessError(f"unknown validation rule '{rule}'; valid: atlas, fusionbench")


def split_train(n: int, rule: str = "atlas") -> tuple[list[int], list[int]]:
    """The reference code's train/validation split of a train split of ``n`` images, as index
    lists: ``torch.utils.data.random_split(range(n), [n - v, v],
    generator=torch.Generator().manual_seed(0))`` with ``v = val_size(n, rule)``. The first part
    trains, the second validates."""
    import torch
    from torch.utils.data import random_split
    v = val_size(n, rule)
    train, val = random_split(range(n), [n - v, v], generator=torch.Generator().manual_seed(0))
    return list(train.indices), list(val.indices)
