"""benchmarks/data_read_speed.py in a tiny size: the table has every row with positive rates, and
the harness's streamed split yields exactly torchvision's pixels (ImageFolder + open_clip's
inference transform) for the same files, from image files and from Parquet shards.

Numbers only, never timings: the speed figures come from running the script itself."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_read_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_read_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_read_speed"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("data_read_speed", None)


@pytest.mark.parametrize("workers", [0, 2])
def test_table_has_every_row_with_positive_rates(bench, workers, tmp_path, capsys):
    out = tmp_path / "result.json"
    # batch 16 < n, so the harness's passes really go through its DataLoader workers
    res = bench.main(["--n", "64", "--size", "64", "--batch", "16", "--repeats", "1",
                      "--workers", str(workers), "--formats", "jpeg,png", "--check", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert [(r["format"], r["path"]) for r in res["rows"]] == [
        (f, p) for f in ("jpeg", "png") for p in bench.PATHS]
    for row in res["rows"]:
        assert len(row["rates"]) == 1 and row["median"] > 0 and row["ratio"] > 0
        line = next(ln for ln in printed.splitlines() if ln.split()[:1] == [row["format"]]
                    and row["path"] in ln)
        assert line[:24].strip().split(maxsplit=1) == [row["format"], row["path"]]  # columns 7 + 15 wide
        rate, *_, ratio, cpu_ms = line[24:].split()
        assert float(rate) == pytest.approx(row["median"], abs=0.06)
        assert float(cpu_ms) == pytest.approx(row["cpu_ms_median"], abs=0.006) and row["cpu_ms_median"] > 0
        if row["path"] == bench.REFERENCE:
            assert row["ratio"] == 1 and ratio == "(reference)"
        else:
            assert ratio == f"{row['ratio']:.2f}"
    assert "harness/torchvision" in printed and "max |harness - torchvision|" in printed
    assert res["config"]["workers"] == workers
    for diffs in res["pixels_max_abs_diff"].values():
        assert set(diffs) == {"files", "parquet"} and max(diffs.values()) <= 1e-6


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_harness_pixels_are_imagefolders_for_the_same_file(bench, fmt, tmp_path):
    from torchvision.datasets import ImageFolder

    # 240 px sources: open_clip's bicubic antialiased downscale to 224, then the centre crop
    data = bench.build(tmp_path, 20, 240, [fmt], row_group=3)[fmt]
    paths = bench.Paths(data, batch=8, workers=2)
    reference = ImageFolder(str(data["folder"]), transform=paths.preprocess)
    want = torch.stack([reference[i][0] for i in range(20)])
    assert want.dtype == torch.float32 and want.shape == (20, 3, 224, 224)
    assert [y for _, y in reference.samples] == data["labels"] == paths.parquet.samples.labels.tolist()
    for split in (paths.files, paths.parquet):
        u8 = torch.cat(list(split.batches(8)))       # streamed through 2 worker processes
        assert u8.dtype == torch.uint8 and u8.shape == (20, 3, 224, 224)
        assert torch.equal(u8, split[np.arange(20)])  # the same as decoding in this process
        assert (paths.prepare(u8) - want).abs().max() <= 1e-6
    assert torch.equal(paths.files[np.arange(20)], paths.parquet[np.arange(20)])
    # one whole pass of each timed path yields every image
    assert all(paths.run(p) == 20 for p in bench.PATHS)
