"""harness.data.prompts: class names and templates equal the reference code's lists.

(a) The 8 standard tasks' lists equal the reference code's lists (mlfoundations/task_vectors and
    fredzzhang/atlas, ``src/datasets/templates.py`` and the data sets' class names), copied below
    as literals: they are the specification.
(b) Counts and first/last entries.
(c) Every template has '{}' exactly once and renders with every class name.
(d) The FusionBench wheel (fusion_bench==0.2.33, downloaded with pip, sha256-checked, read as a
    zip and parsed with ``ast``; none of its code is imported or run): the "fusionbench" variant
    equals FB's lists, and "atlas" equals FB except exactly where the two codes' lists differ.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.api import HarnessError
from harness.data.prompts import FB_MODULES, VARIANTS, Prompts, names, prompts

ATLAS22 = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN", "CIFAR10",
           "CIFAR100", "ImageNet", "STL10", "Food101", "Caltech101", "Caltech256", "FGVCAircraft",
           "Flowers102", "OxfordIIITPet", "CUB200", "PascalVOC", "Country211", "UCF101"]
FB_ONLY = ["pcam", "fer2013", "fashion_mnist", "emnist_letters", "emnist_mnist", "kmnist",
           "rendered-sst2"]
STANDARD8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]

# ---------------------------------------------------------------------------------------------
# Class names, verbatim from the reference code
CLASSES_MNIST = [  # 10 entries
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
]
CLASSES_SVHN = [  # 10 entries
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
]
CLASSES_EuroSAT = [  # 10 entries
    'annual crop land', 'forest', 'brushland or shrubland', 'highway or road',
    'industrial buildings or commercial buildings', 'pasture land', 'permanent crop land',
    'residential buildings or homes or apartments', 'river', 'lake or sea',
]
CLASSES_RESISC45 = [  # 45 entries
    'airplane', 'airport', 'baseball diamond', 'basketball court', 'beach', 'bridge', 'chaparral',
    'church', 'circular farmland', 'cloud', 'commercial area', 'dense residential', 'desert',
    'forest', 'freeway', 'golf course', 'ground track field', 'harbor', 'industrial area',
    'intersection', 'island', 'lake', 'meadow', 'medium residential', 'mobile home park',
    'mountain', 'overpass', 'palace', 'parking lot', 'railway', 'railway station',
    'rectangular farmland', 'river', 'roundabout', 'runway', 'sea ice', 'ship', 'snowberg',
    'sparse residential', 'stadium', 'storage tank', 'tennis court', 'terrace',
    'thermal power station', 'wetland',
]
CLASSES_DTD = [  # 47 entries
    'banded', 'blotchy', 'braided', 'bubbly', 'bumpy', 'chequered', 'cobwebbed', 'cracked',
    'crosshatched', 'crystalline', 'dotted', 'fibrous', 'flecked', 'freckled', 'frilly', 'gauzy',
    'grid', 'grooved', 'honeycombed', 'interlaced', 'knitted', 'lacelike', 'lined', 'marbled',
    'matted', 'meshed', 'paisley', 'perforated', 'pitted', 'pleated', 'polka-dotted', 'porous',
    'potholed', 'scaly', 'smeared', 'spiralled', 'sprinkled', 'stained', 'stratified', 'striped',
    'studded', 'swirly', 'veined', 'waffled', 'woven', 'wrinkled', 'zigzagged',
]
CLASSES_GTSRB = [  # 43 entries, index = GTSRB ClassId 0..42
    'red and white circle 20 kph speed limit',
    'red and white circle 30 kph speed limit',
    'red and white circle 50 kph speed limit',
    'red and white circle 60 kph speed limit',
    'red and white circle 70 kph speed limit',
    'red and white circle 80 kph speed limit',
    'end / de-restriction of 80 kph speed limit',
    'red and white circle 100 kph speed limit',
    'red and white circle 120 kph speed limit',
    'red and white circle red car and black car no passing',
    'red and white circle red truck and black car no passing',
    'red and white triangle road intersection warning',
    'white and yellow diamond priority road',
    'red and white upside down triangle yield right-of-way',
    'stop',
    'empty red and white circle',
    'red and white circle no truck entry',
    'red circle with white horizonal stripe no entry',
    'red and white triangle with exclamation mark warning',
    'red and white triangle with black left curve approaching warning',
    'red and white triangle with black right curve approaching warning',
    'red and white triangle with black double curve approaching warning',
    'red and white triangle rough / bumpy road warning',
    'red and white triangle car skidding / slipping warning',
    'red and white triangle with merging / narrow lanes warning',
    'red and white triangle with person digging / construction / road work warning',
    'red and white triangle with traffic light approaching warning',
    'red and white triangle with person walking warning',
    'red and white triangle with child and person walking warning',
    'red and white triangle with bicyle warning',
    'red and white triangle with snowflake / ice warning',
    'red and white triangle with deer warning',
    'white circle with gray strike bar no speed limit',
    'blue circle with white right turn arrow mandatory',
    'blue circle with white left turn arrow mandatory',
    'blue circle with white forward arrow mandatory',
    'blue circle with white forward or right turn arrow mandatory',
    'blue circle with white forward or left turn arrow mandatory',
    'blue circle with white keep right arrow mandatory',
    'blue circle with white keep left arrow mandatory',
    'blue circle with white arrows indicating a traffic circle',
    'white circle with gray strike bar indicating no passing for cars has ended',
    'white circle with gray strike bar indicating no passing for trucks has ended',
]

# Class names the reference code derives (from torchvision or the data set files)
CLASSES_PascalVOC = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
                     'cow', 'dining table', 'dog', 'horse', 'motorbike', 'person', 'potted plant',
                     'sheep', 'sofa', 'train', 'tv monitor']
CLASSES_CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck']
CLASSES_STL10 = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship',
                 'truck']

# Prompt templates, verbatim from the reference code
TEMPLATES_SUN397 = [
    'a photo of a {}.',
    'a photo of the {}.',
]
TEMPLATES_Cars = [
    'a photo of a {}.',
    'a photo of the {}.',
    'a photo of my {}.',
    'i love my {}!',
    'a photo of my dirty {}.',
    'a photo of my clean {}.',
    'a photo of my new {}.',
    'a photo of my old {}.',
]
TEMPLATES_RESISC45 = [
    'satellite imagery of {}.',
    'aerial imagery of {}.',
    'satellite photo of {}.',
    'aerial photo of {}.',
    'satellite view of {}.',
    'aerial view of {}.',
    'satellite imagery of a {}.',
    'aerial imagery of a {}.',
    'satellite photo of a {}.',
    'aerial photo of a {}.',
    'satellite view of a {}.',
    'aerial view of a {}.',
    'satellite imagery of the {}.',
    'aerial imagery of the {}.',
    'satellite photo of the {}.',
    'aerial photo of the {}.',
    'satellite view of the {}.',
    'aerial view of the {}.',
]
TEMPLATES_EuroSAT = [
    'a centered satellite photo of {}.',
    'a centered satellite photo of a {}.',
    'a centered satellite photo of the {}.',
]
TEMPLATES_SVHN = [
    'a photo of the number: "{}".',
]
TEMPLATES_GTSRB = [
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
]
TEMPLATES_MNIST = [
    'a photo of the number: "{}".',
]
TEMPLATES_DTD = [
    'a photo of a {} texture.',
    'a photo of a {} pattern.',
    'a photo of a {} thing.',
    'a photo of a {} object.',
    'a photo of the {} texture.',
    'a photo of the {} pattern.',
    'a photo of the {} thing.',
    'a photo of the {} object.',
]
TEMPLATES_CIFAR10 = TEMPLATES_CIFAR100 = [  # TV:templates.py:12-31 and 33-52 (identical lists)
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
    'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.', 'a photo of the {}.',
    'a blurry photo of the {}.', 'a black and white photo of the {}.', 'a low contrast photo of the {}.',
    'a high contrast photo of the {}.', 'a bad photo of the {}.', 'a good photo of the {}.',
    'a photo of the small {}.', 'a photo of the big {}.',
]
TEMPLATES_STL10 = ['a photo of a {}.', 'a photo of the {}.']
TEMPLATES_Food101 = ['a photo of {}, a type of food.']
TEMPLATES_FGVCAircraft = ['a photo of a {}, a type of aircraft.', 'a photo of the {}, a type of aircraft.']
TEMPLATES_Flowers102 = ['a photo of a {}, a type of flower.']
TEMPLATES_OxfordIIITPet = ['a photo of a {}, a type of pet.']
TEMPLATES_CUB200 = ['a photo of a {}, a type of bird.']
TEMPLATES_PascalVOC = ['a photo of a {}.']
TEMPLATES_Country211 = ['a photo i took in {}.', 'a photo i took while visiting {}.', 'a photo from my home country of {}.', 'a photo from my visit to {}.', 'a photo showing the country of {}.']

SPEC_CLASSES = {name[len("CLASSES_"):]: value for name, value in globals().items()
                if name.startswith("CLASSES_")}
SPEC_TEMPLATES = {name[len("TEMPLATES_"):]: value for name, value in globals().items()
                  if name.startswith("TEMPLATES_")}


# --------------------------------------------------------------------------------- (a) the spec
def test_spec_lists_cover_the_standard_tasks():
    assert set(STANDARD8) <= set(SPEC_TEMPLATES)
    assert {"MNIST", "SVHN", "EuroSAT", "RESISC45", "DTD", "GTSRB"} <= set(SPEC_CLASSES)


@pytest.mark.parametrize("name", sorted(SPEC_CLASSES))
def test_classes_equal_spec(name):
    assert prompts(name).classes == tuple(SPEC_CLASSES[name])


@pytest.mark.parametrize("name", sorted(SPEC_TEMPLATES))
def test_templates_equal_spec(name):
    assert prompts(name).templates == tuple(SPEC_TEMPLATES[name])


# ------------------------------------------------------------------------ (b) counts, ends, order
COUNTS = {  # name: (number of classes or None, number of templates)
    "Cars": (196, 8), "DTD": (47, 8), "EuroSAT": (10, 3), "GTSRB": (43, 3), "MNIST": (10, 1),
    "RESISC45": (45, 18), "SUN397": (397, 2), "SVHN": (10, 1), "CIFAR10": (10, 18),
    "CIFAR100": (100, 18), "ImageNet": (1000, 80), "STL10": (10, 2), "Food101": (101, 1),
    "Caltech101": (None, 34), "Caltech256": (None, 34), "FGVCAircraft": (None, 2),
    "Flowers102": (102, 1), "OxfordIIITPet": (37, 1), "CUB200": (200, 1), "PascalVOC": (20, 1),
    "Country211": (211, 5), "UCF101": (None, 48),
    "pcam": (2, 1), "fer2013": (7, 6), "fashion_mnist": (10, 2), "emnist_letters": (26, 1),
    "emnist_mnist": (10, 1), "kmnist": (10, 1), "rendered-sst2": (2, 1),
}


def test_names_are_the_atlas_pool_then_the_fusionbench_tasks():
    assert names() == ATLAS22 + FB_ONLY
    assert set(COUNTS) == set(names())
    assert VARIANTS == ("atlas", "fusionbench")


@pytest.mark.parametrize("name", list(COUNTS))
def test_counts(name):
    n_classes, n_templates = COUNTS[name]
    p = prompts(name)
    assert (None if p.classes is None else len(p.classes)) == n_classes
    assert len(p.templates) == n_templates
    if p.classes is not None:
        assert len(set(p.classes)) == len(p.classes) or name == "ImageNet"
    if p.classes is None:
        assert "derived from disk" in p.provenance


def test_first_and_last_entries():
    sun = prompts("SUN397").classes
    assert sun[:3] == ("abbey", "airplane cabin", "airport terminal")
    assert sun[-3:] == ("wrestling ring indoor", "yard", "youth hostel")
    cars = prompts("Cars").classes
    assert cars[0] == "AM General Hummer SUV 2000" and cars[-1] == "smart fortwo Convertible 2012"
    assert "Ram C/V Cargo Van Minivan 2012" in cars
    assert prompts("MNIST").classes == prompts("SVHN").classes == tuple("0123456789")
    inet = prompts("ImageNet")
    assert inet.classes[0] == "tench" and inet.classes[-1] == "toilet paper"
    assert inet.templates[0] == "a bad photo of a {}." and inet.templates[-1] == "a tattoo of the {}."
    # The OpenAI clean names have two known repeats (two different synsets each).
    assert len(set(inet.classes)) == 998
    ucf = prompts("UCF101").templates
    assert ucf[0] == "a photo of a person {}." and ucf[-1] == "a demonstration of the person practicing {}."
    assert prompts("Caltech101").templates == prompts("Caltech256").templates
    assert prompts("CIFAR10").templates == prompts("CIFAR100").templates
    country = prompts("Country211").classes
    assert country[:2] == ("Andorra", "United Arab Emirates") and country[-1] == "Zimbabwe"
    flowers = prompts("Flowers102").classes
    assert flowers[0] == "pink primrose" and flowers[-1] == "blackberry lily"
    assert prompts("CIFAR100").classes[26] == "crab"
    assert prompts("OxfordIIITPet").classes[:2] == ("Abyssinian", "American Bulldog")
    assert prompts("CUB200").classes[0] == "Black footed Albatross"


def test_orders_match_the_on_disk_derivations():
    # SUN397: TV names ImageFolder's sorted folders '<letter>_<name_with_underscores>'.
    sun = prompts("SUN397").classes
    assert list(sun) == sorted(sun, key=lambda c: f"{c[0]}_{c.replace(' ', '_')}")
    # DTD: sorted folder names; Food101: sorted meta keys (underscores before '_' -> ' ').
    assert list(prompts("DTD").classes) == sorted(prompts("DTD").classes)
    food = prompts("Food101").classes
    assert list(food) == sorted(food, key=lambda c: c.replace(" ", "_"))
    # EuroSAT: the OpenAI names in the order of the sorted CamelCase folders (TV eurosat.py:44-55).
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
    assert folders == sorted(folders) and len(prompts("EuroSAT").classes) == len(folders)


# ------------------------------------------------------------------------- (c) template sanity
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_template_renders_every_class(variant):
    for name in names():
        p = prompts(name, variant)
        assert isinstance(p, Prompts) and isinstance(p.templates, tuple)
        assert p.classes is None or isinstance(p.classes, tuple)
        assert p.provenance
        assert len(set(p.templates)) == len(p.templates), name
        for t in p.templates:
            assert t.count("{}") == 1, (name, t)
            assert "{" not in t.replace("{}", "") and "}" not in t.replace("{}", ""), (name, t)
            for c in p.classes or ("zebra",):
                text = t.format(c)
                assert c in text and text == t.replace("{}", c)


@pytest.mark.parametrize("variant", VARIANTS)
def test_provenance_names_pinned_sources(variant):
    for name in names():
        prov = prompts(name, variant).provenance
        assert "classes:" in prov and "templates:" in prov
        assert ("826a64c67082fab0f40628233287948f0f8d7fa3" in prov
                or "557d7fbd61a28fc85f8463b2fd522706d8e4e980" in prov
                or "fusion_bench==0.2.33" in prov), (name, prov)


def test_api_errors_and_val_suffix():
    with pytest.raises(HarnessError, match="valid names: Cars, DTD"):
        prompts("NoSuchSet")
    with pytest.raises(HarnessError, match="valid variants: atlas, fusionbench"):
        prompts("Cars", "openai")
    assert prompts("CarsVal") is prompts("Cars")
    assert prompts("ImageNetVal", "fusionbench") is prompts("ImageNet", "fusionbench")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prompts("Cars").classes = ()
    with pytest.raises(HarnessError, match="exactly once"):
        Prompts(("a",), ("no placeholder",), "x")


def test_variants_share_where_fusionbench_has_no_list():
    for name in ["Caltech101", "Caltech256", "FGVCAircraft", "PascalVOC", "Country211", "UCF101"]:
        a, f = prompts(name), prompts(name, "fusionbench")
        assert (a.classes, a.templates) == (f.classes, f.templates)
        assert "has no list" in f.provenance
    for name in FB_ONLY:
        a, f = prompts(name), prompts(name, "fusionbench")
        assert (a.classes, a.templates) == (f.classes, f.templates)
        assert "have no list" in a.provenance


# ------------------------------------------------------------------ (d) the FusionBench wheel
FB_WHEEL = "fusion_bench-0.2.33-py3-none-any.whl"
FB_SHA256 = "cf34d2d969073eea0ac49a85d0c2429ceeff12781a71fc5e639844db5412253d"
FB_DIR = "fusion_bench/tasks/clip_classification/"
# aTLAS name -> the task key FusionBench looks the lists up with (its clip_classification task module).
FB_TASK_KEYS = {
    "Cars": "stanford-cars", "DTD": "dtd", "EuroSAT": "eurosat", "GTSRB": "gtsrb",
    "MNIST": "mnist", "RESISC45": "resisc45", "SUN397": "sun397", "SVHN": "svhn",
    "CIFAR10": "cifar10", "CIFAR100": "cifar100", "ImageNet": "imagenet", "STL10": "stl10",
    "Food101": "food101", "Flowers102": "oxford_flowers102", "OxfordIIITPet": "oxford-iiit-pet",
    "CUB200": "cub-200-2011", **{k: k for k in FB_ONLY},
}


@pytest.fixture(scope="session")
def fb_wheel(tmp_path_factory) -> zipfile.ZipFile:
    dest = tmp_path_factory.mktemp("fusion_bench_wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "fusion_bench==0.2.33", "-d", str(dest)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheel = dest / FB_WHEEL
    if run.returncode != 0 or not wheel.is_file():
        pytest.fail(f"could not download the FusionBench wheel with `{' '.join(cmd)}` (PyPI must "
                    f"be reachable for this test): exit {run.returncode}\n{run.stderr[-2000:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert digest == FB_SHA256, f"{FB_WHEEL} has sha256 {digest}, expected {FB_SHA256}"
    return zipfile.ZipFile(wheel)


def _fmt(lam: ast.expr) -> str:
    """``lambda c: f"...{c}..."`` -> ``"...{}..."``, read from the syntax tree."""
    assert isinstance(lam, ast.Lambda) and len(lam.args.args) == 1, ast.dump(lam)
    arg, body = lam.args.args[0].arg, lam.body
    assert isinstance(body, ast.JoinedStr), ast.dump(body)
    parts = []
    for v in body.values:
        if isinstance(v, ast.Constant):
            assert "{" not in v.value and "}" not in v.value
            parts.append(v.value)
        else:
            assert isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
            assert v.value.id == arg and v.conversion == -1 and v.format_spec is None
            parts.append("{}")
    return "".join(parts)


_CALLS = {"str": str, "range": range, "list": list, "OrderedDict": dict}


def _value(node: ast.expr, env: dict):
    """Evaluate the few expression forms FB's list modules use, without running any code:
    literals, names bound earlier in the module, ``d[str(i)]``, ``[... for i in range(n)]``,
    ``OrderedDict({...})`` and ``list(d.keys()/values())``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, env) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k, env): _value(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Subscript):
        return _value(node.value, env)[_value(node.slice, env)]
    if isinstance(node, ast.Call) and not node.keywords:
        if isinstance(node.func, ast.Name) and node.func.id in _CALLS:
            return _CALLS[node.func.id](*[_value(a, env) for a in node.args])
        if (isinstance(node.func, ast.Attribute) and not node.args
                and node.func.attr in ("keys", "values")):
            return list(getattr(dict(_value(node.func.value, env)), node.func.attr)())
    if (isinstance(node, ast.ListComp) and len(node.generators) == 1
            and not node.generators[0].ifs and isinstance(node.generators[0].target, ast.Name)
            and not isinstance(node.elt, ast.Lambda)):
        gen = node.generators[0]
        return [_value(node.elt, {**env, gen.target.id: x}) for x in _value(gen.iter, env)]
    raise ValueError(f"unsupported expression {ast.dump(node)[:200]}")


def _fb_module(wheel: zipfile.ZipFile, module: str) -> tuple[dict, dict]:
    """Top-level assignments of one FB list module: ({name: value}, {name: assignment node})."""
    tree = ast.parse(wheel.read(f"{FB_DIR}{module}.py").decode("utf-8"))
    env, nodes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            nodes[name] = node
            if isinstance(value, ast.List) and value.elts and isinstance(value.elts[0], ast.Lambda):
                env[name] = [_fmt(e) for e in value.elts]
            else:
                try:
                    env[name] = _value(value, env)
                except (ValueError, KeyError):
                    pass  # e.g. imagenet's lambda comprehension, checked separately
    return env, nodes


@pytest.fixture(scope="session")
def fb_lists(fb_wheel) -> dict[str, tuple[list[str], list[str]]]:
    """aTLAS/FB name -> (classnames, templates) as FusionBench 0.2.33 looks them up."""
    init = ast.parse(fb_wheel.read(f"{FB_DIR}__init__.py").decode("utf-8"))
    mapping = next(ast.literal_eval(n.value) for n in ast.walk(init)
                   if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                   and n.targets[0].id == "_dataset_mapping")
    out = {}
    for name, key in FB_TASK_KEYS.items():
        info = mapping[key]
        info = info if isinstance(info, dict) else {"module": info, "classnames": "classnames",
                                                    "templates": "templates"}
        module = info["module"].lstrip(".")
        assert module == FB_MODULES[name], (name, key, module)
        env, nodes = _fb_module(fb_wheel, module)
        if module == "imagenet":
            # FB's `templates = [lambda c: prompt.format(c) for prompt in imagenet_templates]`:
            # every lambda looks `prompt` up when called, so all 80 give the last template.
            comp = nodes["templates"].value
            assert isinstance(comp, ast.ListComp) and isinstance(comp.elt, ast.Lambda)
            call = comp.elt.body
            assert isinstance(call, ast.Call) and call.func.attr == "format"
            assert call.func.value.id == comp.generators[0].target.id == "prompt"
            assert comp.generators[0].iter.id == "imagenet_templates"
            templates = env["imagenet_templates"]
            assert templates[-1] == "a tattoo of the {}."
        else:
            templates = env[info["templates"]]
        out[name] = (env[info["classnames"]], templates)
    return out


def test_fusionbench_variant_equals_fusionbench(fb_lists):
    for name, (classes, templates) in fb_lists.items():
        p = prompts(name, "fusionbench")
        assert p.classes == tuple(classes), name
        assert p.templates == tuple(templates), name
        assert "fusion_bench==0.2.33" in p.provenance


def _diff(a, b) -> dict[int, tuple[str, str]]:
    assert len(a) == len(b)
    return {i: (x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y}


def test_atlas_differs_from_fusionbench_exactly_where_the_spec_says(fb_lists):
    """FusionBench's lists are the reference code's except for the data sets listed here."""
    for name in STANDARD8 + ["CIFAR10", "STL10", "Food101"] + FB_ONLY:
        p = prompts(name)
        assert (p.classes, p.templates) == tuple(map(tuple, fb_lists[name])), name
    for name in ["CIFAR100", "ImageNet", "Flowers102", "OxfordIIITPet"]:
        assert prompts(name).templates == tuple(fb_lists[name][1]), name

    fb_classes = {name: fb_lists[name][0] for name in fb_lists}
    assert _diff(prompts("Flowers102").classes, fb_classes["Flowers102"]) == {
        15: ("globe flower", "globe-flower"),
        59: ("pink and yellow dahlia", "pink-yellow dahlia?"),
        92: ("air plant", "ball moss")}
    assert _diff(prompts("CIFAR100").classes, fb_classes["CIFAR100"]) == {26: ("crab", "cra")}
    pets = prompts("OxfordIIITPet").classes
    assert len(_diff(pets, fb_classes["OxfordIIITPet"])) == 37
    assert list(pets) == [" ".join(p.title() for p in c.split("_"))
                          for c in fb_classes["OxfordIIITPet"]]
    assert fb_classes["OxfordIIITPet"][:2] == ["abyssinian", "american_bulldog"]
    cub = prompts("CUB200")
    assert list(cub.classes) == [c.replace("_", " ") for c in fb_classes["CUB200"]]
    assert fb_classes["CUB200"][0] == "Black_footed_Albatross"
    assert cub.templates == ("a photo of a {}, a type of bird.",)
    assert fb_lists["CUB200"][1] == ["a photo of a {}.", "a photo of the {}."]
    inet = _diff(prompts("ImageNet").classes, fb_classes["ImageNet"])
    assert len(inet) == 622
    assert inet[0] == ("tench", "tench, Tinca tinca")
    assert prompts("ImageNet").classes[6] == fb_classes["ImageNet"][6] == "stingray"
    assert inet[2] == ("great white shark",
                       "great white shark, white shark, man-eater, man-eating shark, "
                       "Carcharodon carcharias")
