"""harness.data.tv_layout: readers for the task_vectors / aTLAS on-disk layout, on tiny fixtures
written in each real format (tests/benchdata.py)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import benchdata as bd  # noqa: E402

from harness.api import HarnessError  # noqa: E402
from harness.data import tv_layout as tv  # noqa: E402
from harness.data.samples import ArraySamples, FileSamples  # noqa: E402
from harness.data.suites import SUITES, spec  # noqa: E402

ARRAY_SETS = {"MNIST", "SVHN", "CIFAR10", "CIFAR100", "STL10"}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """``get(name) -> (root, info)``: each data set's fixture, written once per session (read only)."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"tv-{name}")
            cache[name] = (root, bd.make_tv(name, root))
        return cache[name]
    return get


@pytest.fixture
def fresh(pristine, tmp_path):
    """``get(name) -> (root, info)``: a private copy of a fixture to break (images hard-linked,
    every other file copied, so editing one never touches the session's copy)."""
    def get(name):
        src, info = pristine(name)
        root = tmp_path / "root"

        def copy(a, b):
            return os.link(a, b) if a.lower().endswith(IMAGE_SUFFIXES) else shutil.copy2(a, b)
        shutil.copytree(src, root, copy_function=copy)
        return root, {**info, "location": info["location"].replace(str(src), str(root), 1)}
    return get


def test_supported_covers_the_atlas_pool():
    assert set(tv.SUPPORTED) == set(SUITES["atlas22"])
    assert all(spec(n).name == n for n in tv.SUPPORTED)


@pytest.mark.parametrize("name", tv.SUPPORTED)
def test_reads_fixture(name, pristine):
    root, info = pristine(name)
    assert tv.locate(name, str(root)) == info["location"]
    raw = tv.read(name, str(root))
    assert (raw.name, raw.convention, raw.location) == (name, "tv", info["location"])
    s = spec(name)
    assert set(raw.splits) == ({"train", "val", "test"} if s.own_val else {"train", "test"})
    assert set(raw.splits) == set(info["labels"])
    for split, samples in raw.splits.items():
        assert isinstance(samples, ArraySamples if name in ARRAY_SETS else FileSamples)
        assert len(samples) == len(info["labels"][split]) > 0
        assert samples.labels.tolist() == info["labels"][split], split
        for i in sorted(set(np.linspace(0, len(samples) - 1, 60).astype(int).tolist())):
            im = samples.open(i)
            mod = 16 if im.mode == "L" else 4096
            assert bd.decode(im) == (samples.labels[i], info["serials"][split][i] % mod), (split, samples.where(i))
    assert raw.classes == info["classes"]
    if raw.classes is not None:
        assert len(raw.classes) == s.n_classes


def test_class_names_follow_the_reference_derivations(pristine):
    """Spot checks of the derived names against the reference lists (the class names of the reference code)."""
    def classes(name):
        return tv.read(name, str(pristine(name)[0])).classes
    assert classes("EuroSAT") == bd.EUROSAT_NAMES
    assert classes("DTD")[:3] == ["banded", "blotchy", "braided"]
    resisc = classes("RESISC45")
    assert resisc[2] == "baseball diamond" and resisc[-1] == "wetland" and len(resisc) == 45
    assert tv._RESISC45 == sorted(tv._RESISC45)  # so ImageFolder's sorted order is the list's order
    assert classes("MNIST") == [str(i) for i in range(10)]
    assert classes("Caltech256")[:3] == ["thing 0", "faces easy", "thing 2"]  # "002.faces-easy-101"
    assert classes("Caltech101")[0] == "Faces_easy"  # BACKGROUND_Google is dropped
    assert classes("OxfordIIITPet")[:2] == ["Breed Dog 00", "Breed01"]
    assert classes("SUN397")[0] == "abbey 000"


def test_either_naming_convention(tmp_path):
    bd.make_tv("Cars", tmp_path)
    assert tv.read("stanford-cars", str(tmp_path)).name == "Cars"
    assert tv.locate("stanford_cars", str(tmp_path)).endswith("stanford_cars")


def test_absent_and_unsupported(tmp_path):
    for name in tv.SUPPORTED:
        assert tv.locate(name, str(tmp_path)) is None
        with pytest.raises(HarnessError) as e:
            tv.read(name, str(tmp_path))
        msg = str(e.value)
        assert "\n" not in msg and "not found" in msg and str(tmp_path) in msg and tv.fetch_hint(name) in msg
    (tmp_path / "svhn").mkdir()  # a bare folder is not the data set
    assert tv.locate("SVHN", str(tmp_path)) is None
    with pytest.raises(HarnessError, match="no task_vectors/aTLAS on-disk layout"):
        tv.read("pcam", str(tmp_path))


def test_fetch_hints_are_one_line():
    for name in tv.SUPPORTED:
        hint = tv.fetch_hint(name)
        assert hint and "\n" not in hint
    assert "valprep.sh" in tv.fetch_hint("ImageNet") and "kaggle" in tv.fetch_hint("Cars").lower()


def test_mnist_gz_files(tmp_path):
    info = bd.make_tv("MNIST", tmp_path)
    raw_dir = Path(info["location"])
    for f in list(raw_dir.iterdir()):
        with open(f, "rb") as src, gzip.open(str(f) + ".gz", "wb") as dst:
            dst.write(src.read())
        f.unlink()
    raw = tv.read("MNIST", str(tmp_path))
    assert raw.splits["test"].labels.tolist() == info["labels"]["test"]
    assert raw.splits["train"].where(0).endswith("train-images-idx3-ubyte.gz image 0")


def test_imagenet_val_fallback(fresh):
    root, info = fresh("ImageNet")
    os.rename(os.path.join(info["location"], "val_in_folder"), os.path.join(info["location"], "val"))
    raw = tv.read("ImageNet", str(root))
    assert raw.splits["test"].labels.tolist() == info["labels"]["test"]
    assert raw.splits["test"].where(0).startswith(os.path.join(info["location"], "val", ""))


def test_python3_cifar_pickles_read_too(tmp_path):
    """Batches re-saved by Python 3 (protocol 2 with _codecs.encode, protocol 5 with _frombuffer)."""
    for protocol in (2, 5):
        root = tmp_path / str(protocol)
        info = bd.make_tv("CIFAR100", root)
        for f in ("train", "test", "meta"):
            path = Path(info["location"]) / f
            obj = pickle.loads(path.read_bytes(), encoding="latin1")
            path.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert tv.read("CIFAR100", str(root)).splits["train"].labels.tolist() == info["labels"]["train"]


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    info = bd.make_tv("CIFAR10", tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    batch = Path(info["location"]) / "data_batch_2"
    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(HarnessError) as e:
        tv.read("CIFAR10", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(batch) in msg and "refused" in msg and "system" in msg
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Malformed layouts: each is one HarnessError line naming the file or folder.

def _set_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _edit(path, old, new, count=1):
    text = Path(path).read_text()
    assert old in text, (path, old)
    Path(path).write_text(text.replace(old, new, count))


def _csv_line(path, n, column, value):
    lines = Path(path).read_text().splitlines()
    parts = lines[n - 1].split(";")
    parts[column] = value
    lines[n - 1] = ";".join(parts)
    Path(path).write_text("\n".join(lines) + "\n")


def _field(path, n, column, value):
    """Set field ``column`` of line ``n`` of a space-separated text file."""
    lines = Path(path).read_text().splitlines()
    parts = lines[n - 1].split(" ")
    parts[column] = value
    lines[n - 1] = " ".join(parts)
    Path(path).write_text("\n".join(lines) + "\n")


def _savemat(path, **variables):
    import scipy.io
    scipy.io.savemat(path, variables)


def _first_image(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())[0]


def _json_edit(path, fn):
    obj = json.loads(Path(path).read_text())
    fn(obj)
    Path(path).write_text(json.dumps(obj))


MALFORMED = {
    # name: (data set, mutate(location), the file or folder named (relative), words in the message)
    "mnist-magic": ("MNIST", lambda d: _set_bytes(d / "train-images-idx3-ubyte", 0, (2049).to_bytes(4, "big")),
                    "train-images-idx3-ubyte", "bad idx magic number 2049"),
    "mnist-length": ("MNIST", lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(
        (d / "t10k-images-idx3-ubyte").read_bytes()[:-5]), "t10k-images-idx3-ubyte", "bytes long"),
    "mnist-label": ("MNIST", lambda d: _set_bytes(d / "train-labels-idx1-ubyte", 8, bytes([12])),
                    "train-labels-idx1-ubyte", "label 12 at index 0 is out of range 0..9"),
    "mnist-count": ("MNIST", lambda d: bd.write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(2), 2049),
                    "t10k-labels-idx1-ubyte", "has 2 labels for the 9 images"),
    "mnist-missing": ("MNIST", lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "t10k-labels-idx1-ubyte",
                      "missing file"),
    "svhn-no-y": ("SVHN", lambda d: _savemat(d / "test_32x32.mat", X=np.zeros((32, 32, 3, 2), np.uint8)),
                  "test_32x32.mat", "has no 'y' variable"),
    "svhn-label": ("SVHN", lambda d: _savemat(d / "train_32x32.mat", X=np.zeros((32, 32, 3, 2), np.uint8),
                                              y=np.array([[3], [11]], np.uint8)),
                   "train_32x32.mat", "y[1] = 11 is out of range 1..10"),
    "svhn-not-mat": ("SVHN", lambda d: (d / "train_32x32.mat").write_bytes(b"not a mat file at all" * 20),
                     "train_32x32.mat", "is not a readable .mat file"),
    "gtsrb-csv-line": ("GTSRB", lambda d: _csv_line(d / "GT-final_test.csv", 3, 7, "x"), "GT-final_test.csv",
                       "line 3: ClassId 'x' is not an integer"),
    "gtsrb-csv-label": ("GTSRB", lambda d: _csv_line(d / "GT-final_test.csv", 2, 7, "43"), "GT-final_test.csv",
                        "line 2: ClassId 43 is out of range 0..42"),
    "gtsrb-csv-header": ("GTSRB", lambda d: _edit(d / "GT-final_test.csv", "ClassId", "Class"), "GT-final_test.csv",
                         "lacks the Filename and ClassId columns"),
    "gtsrb-test-image": ("GTSRB", lambda d: _first_image(d / "GTSRB/Final_Test/Images").unlink(),
                         "GT-final_test.csv", "does not exist"),
    "gtsrb-class-missing": ("GTSRB", lambda d: shutil.rmtree(d / "GTSRB/Training/00042"), "GTSRB/Training",
                            "missing 00042"),
    "gtsrb-class-extra": ("GTSRB", lambda d: (d / "GTSRB/Training/00043").mkdir(), "GTSRB/Training", "extra 00043"),
    "gtsrb-csv-missing": ("GTSRB", lambda d: (d / "GT-final_test.csv").unlink(), "GT-final_test.csv", "missing file"),
    "resisc-split-file": ("RESISC45", lambda d: (d / "resisc45-test.txt").unlink(), "resisc45-test.txt",
                          "missing file"),
    "resisc-class-missing": ("RESISC45", lambda d: shutil.rmtree(d / "NWPU-RESISC45/wetland"), "NWPU-RESISC45",
                             "missing wetland"),
    "resisc-listed-absent": ("RESISC45", lambda d: open(d / "resisc45-train.txt", "a").write("airplane_999.jpg\n"),
                             "resisc45-train.txt", "1 listed images are not in"),
    "sun397-val-class": ("SUN397", lambda d: shutil.rmtree(sorted((d / "val").iterdir())[0]), "sun397/val",
                         "has 396 class folders, expected 397; compared with"),
    "dtd-split-folder": ("DTD", lambda d: shutil.rmtree(d / "val"), "dtd/val", "missing folder"),
    "dtd-empty-class": ("DTD", lambda d: [p.unlink() for p in (d / "train/banded").iterdir()], "dtd/train/banded",
                        "holds no image files"),
    "dtd-train-class": ("DTD", lambda d: shutil.rmtree(d / "train/zigzagged"), "dtd/train",
                        "has 46 class folders, expected 47"),
    "eurosat-test-class": ("EuroSAT", lambda d: shutil.rmtree(d / "test/River"), "EuroSAT_splits/test",
                           "missing River"),
    "eurosat-renamed-in-test": ("EuroSAT", lambda d: os.rename(d / "test/Forest", d / "test/Woods"),
                                "EuroSAT_splits/test", "class folders differ from those of"),
    "eurosat-unknown": ("EuroSAT", lambda d: [os.rename(d / s / "Forest", d / s / "Woods")
                                              for s in ("train", "val", "test")],
                        "EuroSAT_splits/train/Woods", "is not a EuroSAT class folder"),
    "cars-no-class-field": ("Cars", lambda d: shutil.copy(d / "devkit/cars_test_annos.mat",
                                                          d / "cars_test_annos_withlabels.mat"),
                            "cars_test_annos_withlabels.mat", "has no 'fname' and 'class' fields"),
    "cars-meta-field": ("Cars", lambda d: _savemat(d / "devkit/cars_meta.mat", names=np.array(["a"], dtype=object)),
                        "devkit/cars_meta.mat", "has no 'class_names' variable"),
    "cars-label": ("Cars", lambda d: _savemat(d / "devkit/cars_train_annos.mat",
                                              annotations=bd._cars_annotations([("00001.jpg", 196)])),
                   "devkit/cars_train_annos.mat", "annotation 0: class 197 is out of range 1..196"),
    "cars-no-annotations": ("Cars", lambda d: _savemat(d / "devkit/cars_train_annos.mat", x=np.zeros(1)),
                            "devkit/cars_train_annos.mat", "has no 'annotations' variable"),
    "cars-image": ("Cars", lambda d: (d / "cars_test/00002.jpg").unlink(), "cars_test_annos_withlabels.mat",
                   "annotation 1: image"),
    "cifar10-batch": ("CIFAR10", lambda d: (d / "data_batch_3").unlink(), "data_batch_3", "missing file"),
    "cifar100-label": ("CIFAR100", lambda d: (d / "test").write_bytes(bd.py2_pickle(
        {"fine_labels": [100], "data": np.zeros((1, 3072), np.uint8)})), "cifar-100-python/test",
        "'fine_labels'[0] = 100 is out of range 0..99"),
    "cifar100-meta": ("CIFAR100", lambda d: (d / "meta").write_bytes(bd.py2_pickle({"coarse_label_names": []})),
                      "cifar-100-python/meta", "has no list of strings under 'fine_label_names'"),
    "stl10-length": ("STL10", lambda d: open(d / "train_X.bin", "ab").write(b"\0" * 7), "train_X.bin",
                     "not a whole number of 3 x 96 x 96 images"),
    "stl10-label": ("STL10", lambda d: _set_bytes(d / "test_y.bin", 1, bytes([11])), "test_y.bin",
                    "label 11 at index 1 is out of range 1..10"),
    "food-json": ("Food101", lambda d: (d / "meta/test.json").write_text("{not json"), "meta/test.json",
                  "is not valid JSON"),
    "food-image": ("Food101", lambda d: shutil.rmtree(d / "images/dish_000"), "meta/train.json", "does not exist"),
    "caltech101-gap": ("Caltech101", lambda d: (d / "101_ObjectCategories/cat_010/image_0001.jpg").unlink(),
                       "101_ObjectCategories/cat_010", "no image_0001.jpg"),
    "caltech101-category": ("Caltech101", lambda d: shutil.rmtree(d / "101_ObjectCategories/cat_010"),
                            "101_ObjectCategories", "has 100 category folders, expected 101"),
    "caltech256-category": ("Caltech256", lambda d: (d / "256_ObjectCategories/999.extra").mkdir(),
                            "256_ObjectCategories", "has 258 category folders, expected 257"),
    "fgvc-variant": ("FGVCAircraft", lambda d: open(d / "data/images_variant_val.txt", "a").write("1234567 Zeppelin\n"),
                     "data/images_variant_val.txt", "line 10: variant 'Zeppelin' is not in"),
    "fgvc-variants-file": ("FGVCAircraft", lambda d: (d / "data/variants.txt").unlink(), "data/variants.txt",
                           "missing file"),
    "flowers-setid": ("Flowers102", lambda d: _savemat(d / "setid.mat", trnid=np.array([1]), tstid=np.array([2])),
                      "setid.mat", "has no 'valid' variable"),
    "flowers-label": ("Flowers102", lambda d: _savemat(d / "imagelabels.mat", labels=np.full((1, 27), 103)),
                      "imagelabels.mat", "is out of range 1..102"),
    "pets-line": ("OxfordIIITPet", lambda d: open(d / "annotations/test.txt", "a").write("garbage\n"),
                  "annotations/test.txt", "line 38 does not parse"),
    "pets-label": ("OxfordIIITPet", lambda d: _field(d / "annotations/test.txt", 2, 1, "38"),
                   "annotations/test.txt", "line 2: class id 38 is out of range 1..37"),
    "pets-class-absent": ("OxfordIIITPet", lambda d: Path(d / "annotations/trainval.txt").write_text(
        "\n".join(line for line in Path(d / "annotations/trainval.txt").read_text().splitlines()
                  if line.split()[1] != "5") + "\n"), "annotations/trainval.txt", "class ids missing: 5"),
    "cub-split-line": ("CUB200", lambda d: Path(d / "train_test_split.txt").write_text(
        "\n".join(Path(d / "train_test_split.txt").read_text().splitlines()[1:]) + "\n"),
        "train_test_split.txt", "has no line for image id 1"),
    "cub-classes": ("CUB200", lambda d: open(d / "classes.txt", "a").write("201 201.Extra_Bird\n"), "classes.txt",
                    "has 201 classes, expected 200"),
    "voc-doctype": ("PascalVOC", lambda d: _edit(d / "Annotations/000001.xml", "<annotation>",
                                                 '<!DOCTYPE a [<!ENTITY x "y">]><annotation>'),
                    "Annotations/000001.xml", "DOCTYPE/ENTITY declaration"),
    "voc-class": ("PascalVOC", lambda d: _edit(d / "Annotations/000002.xml", "<name>", "<name>dino"),
                  "Annotations/000002.xml", "is not a VOC2007 class"),
    "voc-box": ("PascalVOC", lambda d: _edit(d / "Annotations/000004.xml", "<xmin>0</xmin>", "<xmin>0.5</xmin>"),
                "Annotations/000004.xml", "bndbox xmin '0.5' is not an integer"),
    "voc-annotation-missing": ("PascalVOC", lambda d: (d / "Annotations/000009.xml").unlink(),
                               "ImageSets/Main/aeroplane_test.txt", "line 3: annotation"),
    "voc-split-line": ("PascalVOC", lambda d: open(d / "ImageSets/Main/aeroplane_val.txt", "a").write("000004 1 x\n"),
                       "ImageSets/Main/aeroplane_val.txt", "line 4 does not parse"),
    "country211-split": ("Country211", lambda d: shutil.rmtree(d / "valid"), "country211/valid", "missing folder"),
    "ucf-label": ("UCF101", lambda d: _json_edit(d / "split_zhou_UCF101.json",
                                                 lambda o: o["test"][0].__setitem__(1, 101)),
                  "split_zhou_UCF101.json", "test[0]: label 101 is out of range 0..100"),
    "ucf-entry": ("UCF101", lambda d: _json_edit(d / "split_zhou_UCF101.json", lambda o: o["val"].append(["x", 1])),
                  "split_zhou_UCF101.json", "val[101] is not [relative path, label, class name]"),
    "ucf-escape": ("UCF101", lambda d: _json_edit(d / "split_zhou_UCF101.json",
                                                  lambda o: o["train"][0].__setitem__(0, "../../outside.jpg")),
                   "split_zhou_UCF101.json", "train[0]: image"),
    "food-escape": ("Food101", lambda d: _json_edit(d / "meta/train.json",
                                                    lambda o: o["dish_000"].append("../../../etc/passwd")),
                    "meta/train.json", "lies outside"),
    "imagenet-flat-val": ("ImageNet", lambda d: (shutil.rmtree(d / "val_in_folder"), (d / "val").mkdir(),
                                                 (d / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")),
                          "imagenet/val", "has 0 class folders, expected 1000 (are the images re-foldered"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_layout_is_one_error_naming_the_file(case, fresh):
    name, mutate, named, words = MALFORMED[case]
    root, info = fresh(name)
    location = Path(info["location"])
    mutate(location)
    with pytest.raises(HarnessError) as e:
        tv.read(name, str(root))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: ")
    assert os.path.join(str(location), named) in msg or os.path.join(str(root), named) in msg, msg
    assert words in msg, msg
