"""The field's benchmark data: suites and names, the reference validation split, Hugging Face
Parquet shards, and benchmark data sets scored through a user's CLIP model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.api import HarnessError
from harness.data import suites
from harness.data.suites import spec, split_train, val_size
from tests.hfdata import encode, label_image, make_hf, write_split


def test_suites_in_their_order_and_naming():
    assert suites.suite("ta8") == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert suites.suite("ta8-atlas") == ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"]
    assert len(suites.suite("tall14")) == 14 and suites.suite("tall14")[8:] == [
        "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
    assert len(suites.suite("tall20")) == 20 and suites.suite("tall20")[-1] == "rendered-sst2"
    atlas22 = suites.suite("atlas22")
    assert len(atlas22) == 22 and atlas22[:2] == ["Cars", "DTD"] and atlas22[-1] == "UCF101"
    # Both conventions name the same data set; every suite entry is known.
    assert spec("stanford-cars") is spec("Cars") is spec("cars") is spec("tanganke/stanford_cars")
    assert spec("oxford_flowers102").name == "Flowers102" and spec("oxford-iiit-pet").name == "OxfordIIITPet"
    assert all(spec(t) is not None for s in suites.SUITES for t in suites.suite(s))
    assert spec("no-such-set") is None
    with pytest.raises(HarnessError, match="unknown suite 'ta9'; valid: ta8"):
        suites.suite("ta9")


def test_validation_sizes_equal_paper_table_5():
    """v = min(int(0.1 n), 5000) of the whole train split reproduces Table 5's val column for
    every data set without its own validation split; FusionBench's rule has no cap."""
    checked = 0
    for s in suites.SPECS.values():
        if s.sizes is None or s.own_val:
            continue
        assert val_size(s.raw_train) == s.sizes[1], s.name
        checked += 1
    assert checked == 16
    assert val_size(60000, "fusionbench") == 6000 and val_size(73257, "fusionbench") == 7325
    with pytest.raises(HarnessError, match="valid: atlas, fusionbench"):
        val_size(10, "paper")


def test_split_train_is_random_split_seed_0():
    """task_vectors asserts the first MNISTVal train index is 36044; more vectors from the spec."""
    train, val = split_train(60000)
    assert train[0] == 36044 and len(train) == 55000 and len(val) == 5000
    train, val = split_train(73257)
    assert train[:3] == [18812, 16192, 59530] and val[:3] == [46097, 42966, 60224]
    train, val = split_train(3760)
    assert train[:3] == [3324, 3133, 895] and val[:3] == [180, 750, 2533]
    ref = torch.utils.data.random_split(range(26640), [26640 - 2664, 2664], generator=torch.Generator().manual_seed(0))
    assert split_train(26640) == (list(ref[0].indices), list(ref[1].indices))


def _decoded_label(im) -> int:
    return int(round((np.asarray(im.convert("RGB"))[..., 0].mean() - 10) / 20))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_parquet_shards_read_in_row_order(tmp_path, fmt):
    from harness.data import hf_parquet
    labels = make_hf(tmp_path, "dtd", {"train": 30, "test": 11}, n_classes=3, fmt=fmt, shards=3)
    assert hf_parquet.locate("DTD", str(tmp_path)) == str(tmp_path / "dtd")
    raw = hf_parquet.read("dtd", str(tmp_path))
    assert raw.convention == "hf" and set(raw.splits) == {"train", "test"}
    for split, samples in raw.splits.items():
        np.testing.assert_array_equal(samples.labels, labels[split])
        assert [_decoded_label(samples.open(i)) for i in range(len(samples))] == labels[split].tolist()
    sub = raw.splits["train"].subset([5, 0, 29])
    assert sub.labels.tolist() == labels["train"][[5, 0, 29]].tolist()
    assert _decoded_label(sub.open(2)) == labels["train"][29]


def test_hub_cache_layout_is_found(tmp_path):
    from harness.data import hf_parquet
    snap = tmp_path / "datasets--tanganke--sun397" / "snapshots" / "abc123"
    make_hf(snap.parent, "abc123", {"train": 4, "test": 4})
    (tmp_path / "datasets--tanganke--sun397" / "refs").mkdir()
    (tmp_path / "datasets--tanganke--sun397" / "refs" / "main").write_text("abc123")
    assert hf_parquet.locate("SUN397", str(tmp_path)) == str(snap)


def test_malformed_parquet_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from harness.data import benchmark, hf_parquet
    img = encode(label_image(0, 0), "png")
    # No label column.
    (tmp_path / "a" / "dtd" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": pa.array([{"bytes": img, "path": "x"}])}),
                       tmp_path / "a" / "dtd" / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(HarnessError, match=r"train-00000-of-00001.parquet has no 'label' column") as e:
        hf_parquet.read("dtd", str(tmp_path / "a"))
    assert "\n" not in str(e.value)
    # A missing shard.
    write_split(tmp_path / "b" / "dtd" / "data", "train", [img] * 4, [0, 1, 2, 0], shards=2)
    write_split(tmp_path / "b" / "dtd" / "data", "test", [img] * 4, [0, 1, 2, 0], shards=2)
    (tmp_path / "b" / "dtd" / "data" / "test-00001-of-00002.parquet").unlink()
    with pytest.raises(HarnessError, match=r"split 'test' is missing shard\(s\) test-00001-of-00002.parquet"):
        hf_parquet.read("dtd", str(tmp_path / "b"))
    # A missing split.
    write_split(tmp_path / "c" / "dtd" / "data", "train", [img] * 4, [0, 1, 2, 0], shards=1)
    with pytest.raises(HarnessError, match=r"no 'test' split \(found train\)"):
        hf_parquet.read("dtd", str(tmp_path / "c"))
    # A label out of range, and labels of the wrong type.
    write_split(tmp_path / "d" / "dtd" / "data", "train", [img] * 2, [0, 47], shards=1)
    write_split(tmp_path / "d" / "dtd" / "data", "test", [img] * 2, [0, 1], shards=1)
    with pytest.raises(HarnessError, match=r"label 47 is outside 0..46"):
        hf_parquet.read("dtd", str(tmp_path / "d"))
    write_split(tmp_path / "e" / "dtd" / "data", "train", [img] * 2, ["a", "b"], shards=1, label_type=pa.string())
    write_split(tmp_path / "e" / "dtd" / "data", "test", [img] * 2, [0, 1], shards=1)
    with pytest.raises(HarnessError, match=r"column 'label' is string, not integer class indices"):
        hf_parquet.read("dtd", str(tmp_path / "e"))
    # Not Parquet at all.
    (tmp_path / "f" / "dtd" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "f" / "dtd" / "data" / f"{split}-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(HarnessError, match=r"is not a readable Parquet file"):
        hf_parquet.read("dtd", str(tmp_path / "f"))
    # A corrupt image is named when it is decoded (never dropped).
    write_split(tmp_path / "g" / "dtd" / "data", "train", [img, b"garbage"], [0, 1], shards=1)
    write_split(tmp_path / "g" / "dtd" / "data", "test", [img] * 2, [0, 1], shards=1)
    raw = hf_parquet.read("dtd", str(tmp_path / "g"))
    with pytest.raises(HarnessError, match=r"cannot decode image .*train-00000-of-00001.parquet row group 0 row 1"):
        raw.splits["train"].open(1)
    assert benchmark.find("dtd", str(tmp_path / "zzz")) is None


def test_benchmark_load_makes_the_reference_splits(tmp_path):
    from harness.data import benchmark
    from harness.data.prompts import prompts
    labels = make_hf(tmp_path, "dtd", {"train": 40, "test": 9}, n_classes=5)
    d = benchmark.load("DTD", str(tmp_path))
    assert d.convention == "hf" and d.spec.name == "DTD"
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 36, "val": 4, "test": 9}
    train_idx, val_idx = split_train(40)
    np.testing.assert_array_equal(d.splits["val"].labels, labels["train"][val_idx])
    np.testing.assert_array_equal(d.splits["train"].labels, labels["train"][train_idx])
    p = prompts("DTD")
    assert d.classes == list(p.classes) and d.templates == list(p.templates) and len(d.classes) == 47
    assert d.info["val_from"] == "train split, atlas rule" and d.info["paper_sizes"] == {"train": 3384, "val": 376, "test": 1880}
    fb = benchmark.load("dtd", str(tmp_path), val_rule="fusionbench")
    assert len(fb.splits["val"]) == 4  # int(0.1 * 40), the cap only bites above 50,000
    assert d.fingerprint() == benchmark.load("dtd", str(tmp_path)).fingerprint()
    with pytest.raises(HarnessError, match="not found under"):
        benchmark.load("mnist", str(tmp_path))
    with pytest.raises(HarnessError, match="valid: auto, tv, hf"):
        benchmark.find("dtd", str(tmp_path), "torchvision")


def _checkpoints(model, tmp_path, names, scale=0.02):
    from harness.checkpoints import save_state_dict
    torch.manual_seed(1)
    paths = []
    for ds in names:
        sd = {f"visual.{k}": v + scale * torch.randn_like(v) for k, v in model.visual.state_dict().items()}
        path = tmp_path / "ft" / f"{ds}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_state_dict(sd, path)
        paths.append(str(path))
    return paths


def test_streamed_and_resident_benchmark_splits_score_the_same(tmp_path, tiny_open_clip):
    from harness.composition import Composition
    from harness.sources.open_clip import BenchOptions, from_checkpoints
    model, folder = tiny_open_clip
    make_hf(tmp_path / "data", "dtd", {"train": 30, "test": 12}, n_classes=4, fmt="jpeg")
    make_hf(tmp_path / "data", "eurosat", {"train": 20, "test": 10}, n_classes=4)
    names = ["dtd", "eurosat"]
    paths = _checkpoints(model, tmp_path, names)
    kw = dict(data_root=str(tmp_path / "data"), bench=BenchOptions())
    resident = from_checkpoints("", f"local-dir:{folder}", paths, names, **kw)
    streamed = from_checkpoints("", f"local-dir:{folder}", paths, names, max_resident_mb=1e-6, **kw)
    assert isinstance(resident.inputs["dtd"]["test"], torch.Tensor)
    assert not isinstance(streamed.inputs["dtd"]["test"], torch.Tensor)
    assert not isinstance(streamed.inputs["dtd"]["val"], torch.Tensor)
    comp = Composition(resident.base, [resident.task_vectors[d] for d in names], names)
    params = comp.merge(comp.isotropic(0.4))
    for ds in names:
        for split in ("train", "val", "test"):
            assert resident.accuracy(params, ds, split) == streamed.accuracy(params, ds, split)
        torch.testing.assert_close(resident.heads[ds][0], streamed.heads[ds][0])
    info = resident.meta["data"]["dtd"]
    assert info["convention"] == "hf" and info["sizes"] == {"train": 27, "val": 3, "test": 12}
    assert resident.meta["templates"]["dtd"][0] == "a photo of a {} texture."
    assert len(resident.classes["dtd"]) == 47 and resident.classes["eurosat"][0] == "annual crop land"


def _tv_as_parquet(raw, folder):
    """The same image files, in the same order, as Hugging Face Parquet shards."""
    from pathlib import Path
    for split in ("train", "test"):
        s = raw.splits[split]
        write_split(Path(folder) / "data", split, [Path(p).read_bytes() for p in s.paths], s.labels.tolist(), shards=2)


def test_same_images_in_both_conventions_give_the_same_run(tmp_path, tiny_open_clip):
    """DTD written in the task_vectors layout and, byte for byte and in the same order, as
    Parquet shards: the same splits, and an addition run with the same result."""
    from harness.data import benchmark, tv_layout
    from harness.runner import run
    from harness.config import RunConfig
    from tests.benchdata import make_tv
    model, folder = tiny_open_clip
    make_tv("DTD", tmp_path / "tv")
    make_tv("EuroSAT", tmp_path / "tv")
    for name, key in (("DTD", "dtd"), ("EuroSAT", "eurosat")):
        _tv_as_parquet(tv_layout.read(name, str(tmp_path / "tv")), tmp_path / "hf" / key)
    a = benchmark.load("DTD", str(tmp_path / "tv"))
    b = benchmark.load("dtd", str(tmp_path / "hf"))
    assert (a.convention, b.convention) == ("tv", "hf")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[split].labels, b.splits[split].labels)
        assert np.array_equal(np.asarray(a.splits[split].open(0)), np.asarray(b.splits[split].open(0)))
    paths = _checkpoints(model, tmp_path, ["dtd", "eurosat"])
    finals = {}
    for conv in ("tv", "hf"):
        rec = run(RunConfig(task="addition", searcher="nevergrad", budget=6, seed=0,
                            task_options={"pretrained": f"local-dir:{folder}", "data_root": str(tmp_path / conv),
                                          "checkpoints": [f"dtd={paths[0]}", f"eurosat={paths[1]}"]},
                            results_dir=str(tmp_path / f"results-{conv}"), cache_dir=str(tmp_path / "cache"),
                            quiet=True), log=lambda *a, **k: None)
        assert rec["status"] == "complete", rec.get("error")
        assert rec["family"]["benchmark"]["datasets"]["dtd"]["convention"] == conv
        finals[conv] = rec["final"]
    assert finals["tv"] == finals["hf"]


def _cli(args, capsys):
    from harness.cli import main
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_data_check_reports_found_missing_and_sizes(tmp_path, capsys):
    from tests.benchdata import make_tv
    make_tv("MNIST", tmp_path, per_class=4)
    make_hf(tmp_path, "dtd", {"train": 40, "test": 9}, n_classes=5)
    rc, out, err = _cli(["data", "check", "--datasets", "MNIST,dtd,svhn", "--data-root", str(tmp_path)], capsys)
    assert rc == 1, err  # a data set is missing
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "SIZES DIFFER" in lines["MNIST"] and " tv " in lines["MNIST"] and "10 classes" in lines["MNIST"]
    assert "paper Table 5: train=55000 val=5000 test=10000" in lines["MNIST"]
    assert " hf " in lines["dtd"] and "47 classes" in lines["dtd"] and "train=36 val=4 test=9" in lines["dtd"]
    assert "MISSING" in lines["svhn"] and "ufldl-stanford/svhn" in lines["svhn"] and "tv:" in lines["svhn"]
    rc, out, _ = _cli(["data", "check", "--datasets", "dtd", "--data-root", str(tmp_path), "--decode",
                       "--workers", "0"], capsys)
    assert rc == 0 and "decoded 49 images" in out
    rc, out, _ = _cli(["data", "suites"], capsys)
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["ta8", "8"]


def test_data_check_malformed_is_one_line_exit_2(tmp_path, capsys):
    import shutil
    from tests.benchdata import make_tv
    cases = {}
    # A missing split file (RESISC45's test list).
    loc = make_tv("RESISC45", tmp_path / "a")["location"]
    (tmp_path / "a" / "resisc45" / "resisc45-test.txt").unlink()
    cases["RESISC45"] = (tmp_path / "a", "resisc45-test.txt")
    # A class folder missing from one split (DTD).
    make_tv("DTD", tmp_path / "b")
    victim = sorted((tmp_path / "b" / "dtd" / "val").iterdir())[0]
    shutil.rmtree(victim)
    cases["DTD"] = (tmp_path / "b", "dtd")
    # A Parquet shard without a label column.
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "c" / "svhn" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": pa.array([{"bytes": b"x", "path": "x"}])}),
                       tmp_path / "c" / "svhn" / "data" / f"{split}-00000-of-00001.parquet")
    cases["svhn"] = (tmp_path / "c", "no 'label' column")
    # A corrupt image, found by --decode.
    write_split(tmp_path / "d" / "mnist" / "data", "train", [encode(label_image(1, 0), "png")] * 10 + [b"\x89PNG broken"],
                [1] * 10 + [2], shards=1)
    write_split(tmp_path / "d" / "mnist" / "data", "test", [encode(label_image(1, 0), "png")], [1], shards=1)
    cases["mnist"] = (tmp_path / "d", "cannot decode image")
    for name, (root, needle) in cases.items():
        args = ["data", "check", "--datasets", name, "--data-root", str(root)]
        rc, out, err = _cli(args + (["--decode", "--workers", "0"] if name == "mnist" else []), capsys)
        assert rc == 2, (name, out, err)
        assert err.startswith("error:") and err.count("\n") == 1 and needle in err, (name, err)
    assert not list(tmp_path.rglob("record.json"))


def test_paper_sweep_files_are_generated_from_the_presets():
    """benchmarks/paper-table*.toml equal what scripts/make_paper_sweeps.py writes, and each is a
    valid sweep file (every field type-checked)."""
    import importlib.util
    from pathlib import Path
    from harness.sweeps import read_sweep_file
    root = Path(__file__).resolve().parent.parent
    spec_ = importlib.util.spec_from_file_location("make_paper_sweeps", root / "scripts" / "make_paper_sweeps.py")
    gen = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(gen)
    expected = {"paper-table2.toml": gen.table2()}
    assert (root / "benchmarks" / "paper-table2.toml").read_text() == expected["paper-table2.toml"]
    assert (root / "benchmarks" / "paper-table1.toml").read_text() == gen.table1()
    for name in ("paper-table1.toml", "paper-table2.toml", "paper-table3.toml", "paper-table9.toml", "paper-table16.toml"):
        sweep = read_sweep_file(str(root / "benchmarks" / name))
        assert sweep["task_options"]["suite"] in ("ta8", "ta8-atlas", "atlas22") and sweep["searchers"]
    table9 = read_sweep_file(str(root / "benchmarks" / "paper-table9.toml"))
    assert len(table9["searchers"]) == 22 * 5 and table9["seeds"] == [0, 1, 2]
    assert {s["task_options"]["shots"] for s in table9["searchers"]} == {1, 2, 4, 8, 16}


def test_sweep_device_reaches_the_runs(tmp_path, capsys):
    rc, _, err = _cli(["sweep", "--tasks", "quadratic", "--searchers", "random", "--seeds", "0",
                       "--device", "cuda", "--results-dir", str(tmp_path)], capsys)
    assert rc == 2 and "CUDA is not available" in err and err.count("\n") == 1


def test_a_corrupt_image_read_by_workers_is_still_one_line(tmp_path, capsys):
    """The DataLoader wraps a worker's error in the worker's traceback; the user sees one line."""
    from harness.data import hf_parquet
    from harness.stream import SampleSplit, SquashResize
    good = encode(label_image(1, 0), "png")
    write_split(tmp_path / "mnist" / "data", "train", [good] * 70 + [b"\x89PNG broken"], [1] * 71, shards=1)
    write_split(tmp_path / "mnist" / "data", "test", [good], [1], shards=1)
    rc, _, err = _cli(["data", "check", "--datasets", "mnist", "--data-root", str(tmp_path), "--decode",
                       "--workers", "2"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot decode image" in err and "row group 17 row 2" in err
    split = SampleSplit(hf_parquet.read("mnist", str(tmp_path)).splits["train"], SquashResize(8), 8, workers=2)
    with pytest.raises(HarnessError, match=r"^cannot decode image .*row group 17 row 2") as e:
        list(split.batches(16))
    assert "\n" not in str(e.value)


def test_negation_with_a_data_only_control(tmp_path, tiny_open_clip):
    """``extra_data`` loads a data set without a checkpoint (the paper's ImageNet control): the
    negation run uses it as control; addition and the others' compositions skip it."""
    from harness.config import RunConfig
    from harness.runner import run
    model, folder = tiny_open_clip
    make_hf(tmp_path / "data", "dtd", {"train": 40, "test": 12}, n_classes=4)
    make_hf(tmp_path / "data", "eurosat", {"train": 30, "test": 12}, n_classes=4)
    paths = _checkpoints(model, tmp_path, ["dtd", "eurosat"])
    common = {"pretrained": f"local-dir:{folder}", "data_root": str(tmp_path / "data"),
              "checkpoints": [f"dtd={paths[0]}", f"eurosat={paths[1]}"], "extra_data": ["skdigits"]}
    rec = run(RunConfig(task="negation", searcher="gradient", budget=4, space="per_block",
                        task_options={**common, "target": "dtd", "control": "skdigits", "control_split": "val"},
                        results_dir=str(tmp_path / "res"), cache_dir=str(tmp_path / "cache"), quiet=True),
              log=lambda *a, **k: None)
    assert rec["status"] == "complete", rec.get("error")
    assert {"target_acc", "control_acc"} <= set(rec["final"])
    rec = run(RunConfig(task="addition", searcher="zero-shot", space="per_task", task_options=common,
                        results_dir=str(tmp_path / "res"), cache_dir=str(tmp_path / "cache"), quiet=True),
              log=lambda *a, **k: None)
    assert rec["status"] == "complete" and sorted(k for k in rec["final"] if k.startswith("acc/")) == ["acc/dtd", "acc/eurosat"]


def test_real_idx_files_in_the_mnist_layout(tmp_path, capsys):
    """Real, full-size idx files (Fashion-MNIST from the Debian package the embedded default uses,
    the same format and sizes as MNIST) in torchvision's ``MNIST/raw`` layout: 60,000 / 10,000
    images, the paper's 55,000 / 5,000 / 10,000 split with task_vectors' check index (36044),
    and ``data check`` reports the sizes of Table 5."""
    from pathlib import Path
    from harness.data import benchmark
    src = Path("/usr/share/datasets/fashion-mnist")
    if not (src / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("the dataset-fashion-mnist Debian package is missing: run `make setup`")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        (raw / f.name).symlink_to(f)
    d = benchmark.load("MNIST", str(tmp_path))
    assert d.convention == "tv" and {k: len(v) for k, v in d.splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    train_idx, _ = split_train(60000)
    assert train_idx[0] == 36044
    full = benchmark._tv().read("MNIST", str(tmp_path)).splits["train"]
    np.testing.assert_array_equal(d.splits["train"].labels[:100], full.labels[train_idx[:100]])
    assert np.bincount(d.splits["test"].labels).tolist() == [1000] * 10
    assert d.splits["test"].open(0).size == (28, 28)
    rc, out, _ = _cli(["data", "check", "--datasets", "MNIST", "--data-root", str(tmp_path)], capsys)
    assert rc == 0 and "FOUND" in out and "train=55000 val=5000 test=10000" in out and "SIZES DIFFER" not in out
