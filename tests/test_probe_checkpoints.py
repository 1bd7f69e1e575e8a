"""Probe of the checkpoint readers and ``convert`` with malformed inputs made by construction:
every field of a valid config replaced by every wrong kind of value, every file format cut short
at several offsets, pickles and zips that claim far more memory than they hold, names that are
paths, crashes and full disks mid-conversion. Every outcome must be a clean load or a one-line
:class:`HarnessError` naming the file (exit code 2 on the command line), never another exception,
a hang, a huge allocation, or a file written outside ``--out``."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from harness.api import HarnessError
from harness.checkpoints import load_state_dict
from harness.cli import main
from harness.convert import convert_checkpoints
from harness.sources.hf_clip import convert, lora_deltas, read_folder
from harness.unpickle import MAX_DEPTH, recover_state_dict
from tests.permissions import honour_permissions

ROOT = Path(__file__).resolve().parents[1]
# Smaller than test_hf_clip's TINY (a 64-token vocabulary): hundreds of conversions stay fast.
TINY = dict(text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                             max_position_embeddings=8, vocab_size=64, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                               image_size=16, patch_size=8),
            projection_dim=8)
WRONG = {"list": [1], "object": {}, "string": "16", "null": None, "negative": -2, "zero": 0, "one": 1,
         "huge": 2 ** 40, "float": 1.5, "bool": True}
DELETE = object()


def one_line(err) -> str:
    msg = str(err.value) if hasattr(err, "value") else str(err)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def tower(vis):
    return getattr(vis, "vision_model", vis)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny CLIPModel folder, a CLIPVisionModel fine-tune, the same model saved in shards, a
    LoRA adapter of the vision tower, and their tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    tmp = tmp_path_factory.mktemp("probe_hf")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY)).eval()
    model.save_pretrained(tmp / "pretrained")
    model.save_pretrained(tmp / "sharded", max_shard_size="8KB")
    vis = CLIPVisionModel(model.config.vision_config)
    tower(vis).load_state_dict(model.vision_model.state_dict())
    with torch.no_grad():
        for p in vis.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vis.save_pretrained(tmp / "ft")
    lora_base = CLIPVisionModel(model.config.vision_config)
    tower(lora_base).load_state_dict(model.vision_model.state_dict())
    get_peft_model(lora_base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"],
                                         init_lora_weights=False)).save_pretrained(tmp / "lora")
    return tmp


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """A tiny state dict as a torch zip and as safetensors, and a whole pickled module."""
    tmp = tmp_path_factory.mktemp("probe_torch")
    torch.manual_seed(0)
    module = _Wrapper()
    torch.save(module.state_dict(), tmp / "sd.pt")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / "sd.safetensors"))
    torch.save(module, tmp / "module.pt")
    return tmp


class _Wrapper(torch.nn.Module):
    """A stand-in for the paper's ImageEncoder: a module holding modules, saved whole."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        self.register_buffer("scale", torch.ones(2))


def _torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, compress=zipfile.ZIP_STORED,
               chunks: dict[str, int] | None = None) -> Path:
    """A zip laid out like torch.save's (``archive/data.pkl``, ``archive/data/KEY``), with ``chunks``
    members written as that many MiB of zeros (compressed when ``compress`` says so)."""
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        for key, mib in (chunks or {}).items():
            with z.open(f"archive/data/{key}", "w", force_zip64=True) as f:
                for _ in range(mib):
                    f.write(bytes(1 << 20))
        z.writestr("archive/version", "3\n")
    return path


def _rezip(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """``src`` (a torch zip) with some members' bytes replaced (valid CRCs: the pickle is what differs)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename
            key = next((k for k in replace if name.endswith(k)), None)
            zout.writestr(name, replace[key] if key else zin.read(name))
    return dst


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def _clean_or_harness_error(fn, path) -> object:
    """``fn()``'s value, or None after a one-line HarnessError naming ``path``; anything else fails."""
    try:
        return fn()
    except HarnessError as e:
        msg = one_line(e)
        assert str(path) in msg, msg
        return None


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- 1. a folder's weights are exactly the files its format names ---------------------------------

def test_a_sharded_save_beside_an_older_model_safetensors_is_refused_not_merged(hf, tmp_path):
    shutil.copytree(hf / "sharded", tmp_path / "m")
    sharded = read_folder(str(tmp_path / "m"))[1]
    whole = read_folder(str(hf / "pretrained"))[1]
    assert set(sharded) == set(whole) and all(torch.equal(sharded[k], whole[k]) for k in whole)
    stale = {k: v + 1 for k, v in whole.items()}
    save_file(stale, str(tmp_path / "m" / "model.safetensors"))  # an older save left beside the shards
    with pytest.raises(HarnessError) as err:
        read_folder(str(tmp_path / "m"))
    msg = one_line(err)
    assert msg.startswith(f"{tmp_path / 'm'} holds model.safetensors, which is not read "
                          "(model.safetensors.index.json does not name it)")
    with pytest.raises(HarnessError, match="holds model.safetensors, which is not read"):
        convert(str(tmp_path / "m"), [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_extra_safetensors_beside_model_safetensors_is_refused(hf, tmp_path):
    shutil.copytree(hf / "ft", tmp_path / "ft")
    shutil.copy(tmp_path / "ft" / "model.safetensors", tmp_path / "ft" / "model-old.safetensors")
    with pytest.raises(HarnessError) as err:
        read_folder(str(tmp_path / "ft"))
    assert one_line(err).startswith(f"{tmp_path / 'ft'} holds model-old.safetensors, which is not read (it is "
                                    "not model.safetensors and there is no model.safetensors.index.json)")


@pytest.mark.parametrize("case", ["traversal", "absolute", "subfolder", "missing", "not safetensors",
                                  "weight_map list", "no weight_map", "not json", "key not in shard"])
def test_a_bad_shard_index_is_one_line(hf, tmp_path, case):
    folder = tmp_path / "inner" / "m"
    shutil.copytree(hf / "sharded", folder)
    outside = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(1)}, str(outside))
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    shard = {"traversal": "../../x.safetensors", "absolute": str(outside), "subfolder": "sub/x.safetensors",
             "missing": "model-00009-of-00009.safetensors", "not safetensors": "config.json"}.get(case)
    if shard:
        data["weight_map"][first] = shard
    elif case == "weight_map list":
        data["weight_map"] = list(data["weight_map"])
    elif case == "no weight_map":
        del data["weight_map"]
    elif case == "key not in shard":
        data["weight_map"]["vision_model.extra.weight"] = data["weight_map"][first]
    text = json.dumps(data) if case != "not json" else json.dumps(data)[:-3]
    index.write_text(text)
    with pytest.raises(HarnessError) as err:
        read_folder(str(folder))
    msg = one_line(err)
    assert str(folder) in msg
    expected = {"traversal": "which is not a .safetensors file name inside", "absolute": "not a .safetensors file name",
                "subfolder": "not a .safetensors file name", "missing": "which is not in",
                "not safetensors": "not a .safetensors file name", "weight_map list": "has no weight_map",
                "no weight_map": "has no weight_map", "not json": "is not valid JSON",
                "key not in shard": "lacks 'vision_model.extra.weight'"}[case]
    assert expected in msg


# --- 2. convert writes aside and renames into place --------------------------------------------------

def _convert_cli(hf, out, *extra, names=("skdigits",)):
    return main(["convert", "--pretrained", str(hf / "pretrained"),
                 "--checkpoints", ",".join(f"{n}={hf / 'ft'}" for n in names), "--out", str(out), *extra])


def _old_conversion(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"old": true}')
    (folder / "stale.safetensors").write_bytes(b"old weights")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_convert_refuses_a_non_empty_out_and_replaces_it_only_when_told(hf, tmp_path, capsys):
    old = _old_conversion(tmp_path / "conv")
    assert _convert_cli(hf, tmp_path / "conv") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {tmp_path / 'conv'} is not empty; pass --replace to replace it (the old "
                   "contents are replaced only once the new conversion is complete)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "conv").iterdir()} == old
    assert _convert_cli(hf, tmp_path / "conv", "--replace") == 0
    manifest = json.loads((tmp_path / "conv" / "manifest.json").read_text())
    assert manifest["written"][1] == str(tmp_path / "conv" / "skdigits.safetensors")
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == ["manifest.json", "model", "skdigits.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temporary or old folder left
    (tmp_path / "empty").mkdir()  # an empty --out needs no --replace
    assert _convert_cli(hf, tmp_path / "empty") == 0 and (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "empty"]


def test_a_convert_that_fails_mid_way_leaves_the_old_folder_as_it_was(hf, tmp_path):
    old = _old_conversion(tmp_path / "conv")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(HarnessError) as err:  # the first fine-tune is written before the second fails
        convert_checkpoints(str(hf / "pretrained"), [("a", str(hf / "ft")), ("b", str(bad))],
                            str(tmp_path / "conv"), replace=True)
    assert str(bad / "model.safetensors") in one_line(err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "conv").iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "conv"]


_LIMITED = """
import resource, signal, sys
from harness.cli import main
import harness.convert, harness.sources.hf_clip, harness.checkpoints, open_clip, safetensors.torch
# Python ignores SIGXFSZ: a write past the limit fails with EFBIG, like a full disk. With the default
# action the process is killed in the middle of the write instead, like a crash.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[1] == "full" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
raise SystemExit(main(sys.argv[3:]))
"""


def _limited_convert(hf, out, mode, limit):
    args = ["convert", "--pretrained", str(hf / "pretrained"), "--checkpoints", f"skdigits={hf / 'ft'}",
            "--out", str(out), "--replace"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", _LIMITED, mode, str(limit), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)


def test_a_convert_killed_mid_way_leaves_the_old_folder_and_nothing_that_looks_valid(hf, tmp_path):
    import signal
    old = _old_conversion(tmp_path / "conv")
    r = _limited_convert(hf, tmp_path / "conv", "kill", 2048)  # killed (SIGXFSZ) writing the model weights
    assert r.returncode == -signal.SIGXFSZ, r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "conv").iterdir()} == old
    partial = [p for p in tmp_path.iterdir() if p.name != "conv"]
    assert [p.name.startswith(".conv.converting-") for p in partial] == [True]
    assert not (partial[0] / "manifest.json").exists()


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(hf, tmp_path):
    old = _old_conversion(tmp_path / "conv")
    r = _limited_convert(hf, tmp_path / "conv", "full", 2048)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"error: cannot write the converted files into {tmp_path / 'conv'}: ")
    assert line.endswith(f"(read-only folder or full disk?); {tmp_path / 'conv'} was left as it was")
    assert {p.name: p.read_bytes() for p in (tmp_path / "conv").iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_convert_into_a_read_only_folder_is_one_line(hf, tmp_path):
    import subprocess
    import sys
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-m", "harness", "convert", "--pretrained", str(hf / "pretrained"),
                            "--checkpoints", f"skdigits={hf / 'ft'}", "--out", str(ro / "conv")],
                           capture_output=True, text=True, timeout=300, preexec_fn=honour_permissions,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert line.startswith(f"error: cannot write the converted files into {ro / 'conv'}: ") and "\n" not in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# --- 3. checkpoint names are plain names ---------------------------------------------------------------

BAD_NAMES = {"../../x": "not a plain name", "a/b": "not a plain name", "": "not a plain name",
             ".hidden": "not a plain name", "a b": "not a plain name", "x" * 101: "not a plain name",
             "pretrained": "is reserved", "model": "is reserved", "Manifest": "is reserved"}


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_a_checkpoint_name_that_is_not_a_plain_name_is_refused_everywhere(hf, torch_files, tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    for call in (lambda: convert(str(hf / "pretrained"), [(name, str(hf / "ft"))], work / "hf"),
                 lambda: convert_checkpoints(str(hf / "pretrained"), [(name, str(hf / "ft"))], str(work / "a")),
                 lambda: convert_checkpoints(str(torch_files / "sd.pt"), [(name, str(torch_files / "sd.pt"))],
                                             str(work / "b"))):
        with pytest.raises(HarnessError) as err:
            call()
        msg = one_line(err)
        assert msg.startswith(f"checkpoint name {name!r} ") and BAD_NAMES[name] in msg
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("names", [("a", "a"), ("lfw", "LFW")])
def test_a_checkpoint_name_given_twice_is_refused(hf, tmp_path, capsys, names):
    assert _convert_cli(hf, tmp_path / "conv", names=names) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: checkpoint name {names[1]!r} is given twice") and "\n" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_path_as_name_on_the_command_line_writes_nothing_outside_out(hf, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    code = main(["convert", "--pretrained", str(hf / "pretrained"), "--checkpoints",
                 f"../../x={hf / 'ft'}", "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: checkpoint name '../../x' is not a plain name")
    assert list(tmp_path.iterdir()) == []


# --- 4. tiny files cannot claim large memory or disk --------------------------------------------------

def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    return b"\x8a" + bytes([8]) + n.to_bytes(8, "little")  # LONG1


@pytest.mark.parametrize("kind", ["bytearray", "bytes", "range", "copies of a list", "list of a string"])
def test_a_small_pickle_cannot_make_the_reader_allocate_by_size(tmp_path, kind):
    big = 1 << 31
    if kind in ("bytearray", "bytes"):
        body = _global("builtins", kind) + b"(" + _int(big) + b"tR"
    elif kind == "range":
        body = _global("builtins", "list") + b"(" + _global("builtins", "range") + b"(" + _int(big) + b"tRtR"
    elif kind == "copies of a list":  # a 2 000-element list copied 3 000 times: quadratic from a small pickle
        body = (b"(" + b"K\x01" * 2000 + b"l" + b"q\x00" + b"0" + _global("builtins", "list") + b"q\x01" + b"0"
                + b"(" + b"h\x01h\x00\x85R" * 3000 + b"l")
    else:
        body = _global("builtins", "list") + b"X" + struct.pack("<I", 5) + b"abcde\x85R"
    path = _torch_zip(tmp_path / f"{kind}.pt", b"\x80\x02" + body + b".")
    assert path.stat().st_size < 30_000
    for load in (load_state_dict, recover_state_dict):
        with pytest.raises(HarnessError) as err:
            load(path)
        assert one_line(err).startswith(f"checkpoint {path} ")


@pytest.mark.parametrize("as_module", [False, True])
def test_a_zip_bomb_is_refused_before_it_is_read(tmp_path, as_module, capsys):
    """64 MiB of zeros, deflated to about 64 KB, as the storage of a state dict or of a pickled module."""
    sd = {"w": torch.zeros(4)}
    torch.save(_Wrapper() if as_module else sd, tmp_path / "small.pt")
    pkl = _data_pkl(tmp_path / "small.pt")
    bomb = _torch_zip(tmp_path / "bomb.pt", pkl, compress=zipfile.ZIP_DEFLATED, chunks={"0": 64})
    assert bomb.stat().st_size < 200_000
    for load in (load_state_dict, recover_state_dict):
        with pytest.raises(HarnessError) as err:
            load(bomb)
        msg = one_line(err)
        assert msg.startswith(f"checkpoint {bomb} was refused: its zip members claim ")
        assert "compressed members; torch.save stores them uncompressed" in msg
    code = main(["convert", "--pretrained", str(bomb), "--checkpoints", f"a={bomb}", "--out", str(tmp_path / "out")])
    assert code == 2 and "was refused: its zip members claim" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _View:
    """Pickles as torch's tensor rebuild over ``storage`` with any size, stride and offset."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def _storage(n: int):
    return torch.storage.TypedStorage(wrap_storage=torch.zeros(n).untyped_storage(), dtype=torch.float32,
                                      _internal=True)


@pytest.mark.parametrize("view", [(0, (10 ** 6, 10 ** 6), (0, 0)), (2, (10,), (1,)), (0, (4, 4), (1, 1)),
                                  (-1, (2,), (1,)), (0, (2,), (-1,)), (0, ("2",), (1,))])
def test_a_tensor_view_must_fit_its_storage(tmp_path, view):
    path = tmp_path / "view.pt"
    torch.save({"w": _View(_storage(4), *view)}, path)
    for load in (load_state_dict, recover_state_dict):
        with pytest.raises(HarnessError) as err:
            load(path)
        assert one_line(err).startswith(f"checkpoint {path} ")


def test_a_storage_viewed_many_times_over_is_refused(tmp_path, capsys):
    shared = torch.zeros(1 << 18)  # 1 MiB, viewed 100 times: 100 MiB once written out
    torch.save({f"w{i}": shared for i in range(100)}, tmp_path / "shared.pt")
    assert (tmp_path / "shared.pt").stat().st_size < 2 << 20
    with pytest.raises(HarnessError) as err:
        load_state_dict(tmp_path / "shared.pt")
    assert one_line(err).startswith(f"checkpoint {tmp_path / 'shared.pt'} was refused: its tensors view ")
    torch.save({"a": shared, "b": shared}, tmp_path / "tied.pt")  # tied weights are fine
    assert set(load_state_dict(tmp_path / "tied.pt")) == {"a", "b"}
    expanded = torch.zeros(1).expand(10 ** 6, 10 ** 6)  # a broadcast view: 4 TB once made contiguous
    torch.save({"w": expanded}, tmp_path / "expanded.pt")
    code = main(["convert", "--pretrained", str(tmp_path / "expanded.pt"), "--checkpoints",
                 f"a={tmp_path / 'tied.pt'}", "--out", str(tmp_path / "out")])
    assert code == 2 and "does not fit its storage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _Marker:
    """Stands for a storage in a hand-made legacy file."""


def _legacy_file(path: Path, numel: int) -> Path:
    """torch's legacy (pre-zip) layout: magic number, protocol, system info, the data pickle (one
    float tensor of 4 elements over a storage its persistent id says has ``numel``), the storage
    keys, then the storage's 4 elements."""
    marker = _Marker()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is marker else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"w": _View(marker, 0, (4,), (1,))})
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, info))
                     + data.getvalue() + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 4)
                     + struct.pack("<4f", 1, 2, 3, 4))
    return path


def test_a_legacy_file_cannot_claim_more_storage_than_it_holds(tmp_path):
    honest = load_state_dict(_legacy_file(tmp_path / "honest.pt", 4))  # torch reads the hand-made layout
    assert torch.equal(honest["w"], torch.tensor([1.0, 2, 3, 4]))
    path = _legacy_file(tmp_path / "claims.pt", 1 << 28)  # torch would allocate 1 GiB before reading
    with pytest.raises(HarnessError) as err:
        load_state_dict(path)
    assert one_line(err).startswith(f"checkpoint {path} was refused: its storages claim {1 << 30} bytes, more "
                                    f"than the file's {path.stat().st_size}")


# --- 5. malformed inputs: generated, each a clean load or a one-line error naming the file -----------

def _mutations(config: dict):
    """``(label, mutated config)`` for every field (top level and in each tower) replaced by each
    wrong kind of value or deleted, and for the whole file replaced by a non-object."""
    for value in [[], "clip", None, 1, [[[[]]]]]:
        yield f"whole={value!r}", value
    for section in (None, "vision_config", "text_config"):
        fields = config if section is None else config[section]
        for key in fields:
            for label, value in list(WRONG.items()) + [("deleted", DELETE)]:
                new = json.loads(json.dumps(config))
                target = new if section is None else new[section]
                if value is DELETE:
                    del target[key]
                else:
                    target[key] = value
                yield f"{section or ''}.{key}={label}", new


def test_probe_every_config_field_with_every_wrong_value(hf, tmp_path):
    folder = tmp_path / "pretrained"
    shutil.copytree(hf / "pretrained", folder)
    config = json.loads((folder / "config.json").read_text())
    outcomes = collections.Counter()
    for i, (label, mutated) in enumerate(_mutations(config)):
        (folder / "config.json").write_text(json.dumps(mutated))
        got = _clean_or_harness_error(lambda: convert(str(folder), [("ft", str(hf / "ft"))], tmp_path / f"o{i}"),
                                      folder)
        outcomes["clean" if got else "error"] += 1
        shutil.rmtree(tmp_path / f"o{i}", ignore_errors=True)
        if label.endswith(("num_attention_heads=zero", "vision_config=list", ".vision_config=deleted")):
            assert got is None, label
    assert outcomes["clean"] > 20 and outcomes["error"] > 100, outcomes
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past the parser's recursion
    with pytest.raises(HarnessError, match="is not valid JSON"):
        convert(str(folder), [], tmp_path / "deep")


@pytest.mark.parametrize("case,message", [
    ("list", "config.json holds a JSON list, not an object"),
    ("no vision_config", "config.json: vision_config is missing; expected an object"),
    ("zero heads", "config.json: vision_config.num_attention_heads is '0'; expected a positive integer"),
    ("string size", "config.json: text_config.hidden_size is '16'; expected a positive integer"),
    ("indivisible", "config.json: vision_config.hidden_size 16 is not divisible by num_attention_heads 3"),
    ("wrong size", "weight 'visual.transformer.resblocks.0.mlp.c_fc.weight' has shape (32, 16), but its "
                   "config.json describes (48, 16)"),
    ("more layers", "lacks weights such as ['visual.transformer.resblocks.1.ln_1.weight'"),
])
def test_named_config_faults_are_one_line_errors(hf, tmp_path, case, message):
    folder = tmp_path / "pretrained"
    shutil.copytree(hf / "pretrained", folder)
    config = json.loads((folder / "config.json").read_text())
    if case == "list":
        config = [config]
    elif case == "no vision_config":
        del config["vision_config"]
    elif case == "zero heads":
        config["vision_config"]["num_attention_heads"] = 0
    elif case == "string size":
        config["text_config"]["hidden_size"] = "16"
    elif case == "indivisible":
        config["vision_config"]["num_attention_heads"] = 3
    elif case == "wrong size":
        config["vision_config"]["intermediate_size"] = 48
    else:
        config["vision_config"]["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError) as err:
        convert(str(folder), [], tmp_path / "out")
    msg = one_line(err)
    assert str(folder) in msg and message in msg, msg


def _cuts(n: int) -> list[int]:
    return sorted({0, 1, 7, 8, 9, 16, n // 4, n // 2, 3 * n // 4, max(n - 100, 0), max(n - 22, 0), n - 1})


def test_probe_every_file_format_cut_short(hf, torch_files, tmp_path):
    cases = 0
    # Bare files read by load_state_dict (and safetensors also by read_folder).
    for name in ("sd.safetensors", "sd.pt", "module.pt"):
        whole = (torch_files / name).read_bytes()
        for cut in _cuts(len(whole)):
            path = tmp_path / f"cut{cut}-{name}"
            path.write_bytes(whole[:cut])
            readers = [load_state_dict] + ([lambda p: read_folder(str(p))] if name.endswith(".safetensors") else
                                           [recover_state_dict] if name == "module.pt" else [])
            for read in readers:
                with pytest.raises(HarnessError) as err:
                    read(path)
                assert str(path) in one_line(err)
                cases += 1
    # Each file of a Hugging Face folder, a sharded folder and a LoRA adapter.
    folders = [("pretrained", "config.json"), ("pretrained", "model.safetensors"),
               ("sharded", "model.safetensors.index.json"), ("sharded", "model-00001-of-00005.safetensors"),
               ("lora", "adapter_config.json"), ("lora", "adapter_model.safetensors")]
    for folder, name in folders:
        whole = (hf / folder / name).read_bytes()
        for cut in _cuts(len(whole)):
            work = tmp_path / f"{folder}-{name}-{cut}"
            shutil.copytree(hf / folder, work)
            (work / name).write_bytes(whole[:cut])
            read = (lambda w=work: lora_deltas(w)) if folder == "lora" else (lambda w=work: read_folder(str(w)))
            got = _clean_or_harness_error(read, work / name)
            assert got is None or not whole[cut:].strip(), (folder, name, cut)  # only whitespace cut off
            cases += 1
            shutil.rmtree(work)
    assert cases > 120


def test_a_safetensors_header_longer_than_the_file_is_one_line(torch_files, tmp_path):
    whole = (torch_files / "sd.safetensors").read_bytes()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 62) + whole[8:])
    for read in (load_state_dict, lambda p: read_folder(str(p))):
        with pytest.raises(HarnessError) as err:
            read(path)
        assert one_line(err).endswith(f"its header claims {1 << 62} bytes but only {len(whole) - 8} follow "
                                      "(truncated, or not safetensors)")


LORA_WRONG = dict(WRONG, pattern_list=[["q_proj", 2]])


def test_probe_every_lora_config_field_with_every_wrong_value(hf, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(hf / "lora", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(rank_pattern={"fc1": 2}, alpha_pattern={"fc1": 4})
    outcomes = collections.Counter()
    for key in config:
        for label, value in list(LORA_WRONG.items()) + [("deleted", DELETE)]:
            new = dict(config)
            if value is DELETE:
                del new[key]
            else:
                new[key] = value
            (folder / "adapter_config.json").write_text(json.dumps(new))
            got = _clean_or_harness_error(lambda: lora_deltas(folder), folder)
            outcomes["clean" if got else "error"] += 1
    assert outcomes["clean"] > 20 and outcomes["error"] > 20, outcomes
    for key, value, message in [("lora_alpha", "8", "lora_alpha is '8'; expected a finite number"),
                                ("lora_alpha", None, "lora_alpha is 'None'; expected a finite number"),
                                ("r", DELETE, "r is 'None'; expected the LoRA rank, a positive integer"),
                                ("r", 0, "r is '0'; expected the LoRA rank"), ("r", 2.0, "r is '2.0'"),
                                ("rank_pattern", ["fc1"], "rank_pattern must be an object of module names to "
                                                          "positive integers"),
                                ("alpha_pattern", ["fc1"], "alpha_pattern must be an object")]:
        new = dict(config)
        if value is DELETE:
            del new[key]
        else:
            new[key] = value
        (folder / "adapter_config.json").write_text(json.dumps(new))
        with pytest.raises(HarnessError) as err:
            lora_deltas(folder)
        msg = one_line(err)
        assert msg.startswith(f"{folder / 'adapter_config.json'}: ") and message in msg, msg


def test_lora_patterns_apply_by_module_name(hf, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(hf / "lora", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    plain = lora_deltas(folder)
    key = "encoder.layers.0.mlp.fc1.weight"
    for pattern in ("encoder.layers.0.mlp.fc1", "layers.0.mlp.fc1", "fc1"):  # PEFT's full name or a dotted tail
        config["alpha_pattern"] = {"c1": 100, pattern: 8}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        patterned = lora_deltas(folder)
        assert torch.allclose(patterned[key], 2 * plain[key])
        assert torch.equal(patterned["encoder.layers.0.self_attn.q_proj.weight"],
                           plain["encoder.layers.0.self_attn.q_proj.weight"])


def test_a_lora_update_larger_than_the_base_is_refused_before_it_is_formed(hf, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(hf / "lora", folder)
    a = "base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight"
    save_file({a: torch.zeros(2, 1 << 16), a.replace("lora_A", "lora_B"): torch.zeros(1 << 16, 2)},
              str(folder / "adapter_model.safetensors"))  # 1 MiB whose product would be 16 GiB
    with pytest.raises(HarnessError) as err:
        convert(str(hf / "pretrained"), [("x", str(folder))], tmp_path / "out")
    assert one_line(err) == (f"{folder}: LoRA update of encoder.layers.0.mlp.fc1.weight has shape (65536, 65536), "
                             "expected (32, 16) (an adapter of a different base model)")


def _deep_modules(depth: int) -> bytes:
    """A pickle of module stubs nested ``depth`` deep (built by the stack machine, not recursively)."""
    opened = (_global("evil", "Module") + b")\x81" + b"}" + b"X" + struct.pack("<I", 8) + b"_modules"
              + b"}" + b"X" + struct.pack("<I", 1) + b"m")
    return b"\x80\x02" + opened * depth + b"N" + b"ssb" * depth + b"."


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 20_000])
def test_modules_nested_too_deep_are_one_line(tmp_path, depth):
    path = _torch_zip(tmp_path / "deep.pt", _deep_modules(depth))
    for load in (load_state_dict, recover_state_dict):
        with pytest.raises(HarnessError) as err:
            load(path)
        assert one_line(err).startswith(f"checkpoint {path} nests modules more than {MAX_DEPTH} levels deep")


class _Odd:
    """Pickles as a module whose state is ``state`` (whatever it is)."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return _Wrapper, (), self.state


@pytest.mark.parametrize("state", [
    {"_parameters": [torch.ones(1)]}, {"_parameters": "weights"}, {"_parameters": {1: torch.ones(1)}},
    {"_parameters": {"w": 3}, "_buffers": None}, {"_modules": ["a"]}, {"_modules": {"a": 5, 2: None}},
    {"_buffers": {"b": torch.ones(1)}, "_non_persistent_buffers_set": 7}, ("tuple", "state"), 5,
    {"_parameters": {"w": torch.ones(2)}, "_modules": {"self": None}},
])
def test_odd_module_state_is_a_clean_load_or_one_line(tmp_path, state):
    path = tmp_path / "odd.pt"
    torch.save({"model": _Odd(state), "extra": torch.zeros(1)}, path)
    got = _clean_or_harness_error(lambda: load_state_dict(path), path)
    if got is not None:
        assert all(isinstance(v, torch.Tensor) for v in got.values())


def test_probe_every_byte_of_a_pickled_module(torch_files, tmp_path):
    """data.pkl of a whole pickled module with each byte (a sample of positions) replaced, the zip
    rebuilt around it: each is a clean load or a one-line error."""
    pkl = _data_pkl(torch_files / "module.pt")
    outcomes = collections.Counter()
    for pos in range(2, len(pkl) - 1, max(1, len(pkl) // 80)):
        for value in {0x00, 0xFF, pkl[pos] ^ 0x01, ord("R")}:
            mutated = pkl[:pos] + bytes([value]) + pkl[pos + 1:]
            path = _rezip(torch_files / "module.pt", tmp_path / f"m{pos}-{value}.pt", {"data.pkl": mutated})
            got = _clean_or_harness_error(lambda: recover_state_dict(str(path)), path)
            outcomes["clean" if got else "error"] += 1
            path.unlink()
    assert outcomes["error"] > 50, outcomes


def _with_timeout(fn, seconds=20):
    """``fn()``'s exception or value, failing the test instead of hanging when it blocks."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the reader blocked"
    return box


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(hf, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    shutil.copytree(hf / "pretrained", folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    lora = tmp_path / "lora"
    shutil.copytree(hf / "lora", lora)
    (lora / "adapter_config.json").unlink()
    os.mkfifo(lora / "adapter_config.json")
    os.mkfifo(tmp_path / "fifo.pt")
    os.mkfifo(tmp_path / "fifo.safetensors")
    for fn, path in [(lambda: read_folder(str(folder)), folder / "model.safetensors"),
                     (lambda: lora_deltas(lora), lora / "adapter_config.json"),
                     (lambda: load_state_dict(tmp_path / "fifo.pt"), tmp_path / "fifo.pt"),
                     (lambda: recover_state_dict(str(tmp_path / "fifo.pt")), tmp_path / "fifo.pt"),
                     (lambda: read_folder(str(tmp_path / "fifo.safetensors")), tmp_path / "fifo.safetensors"),
                     (lambda: main(["convert", "--pretrained", str(hf / "pretrained"), "--checkpoints",
                                    f"a={tmp_path / 'fifo.pt'}", "--out", str(tmp_path / "out")]), None)]:
        box = _with_timeout(fn)
        if path is None:
            assert box["value"] == 2
            err = capsys.readouterr().err
            assert err == f"error: checkpoint {tmp_path / 'fifo.pt'} is not a regular file or folder (a FIFO, " \
                          "socket or device)\n"
            continue
        assert isinstance(box.get("error"), HarnessError), box
        msg = one_line(box["error"])
        assert str(path) in msg and "is not a regular file" in msg, msg
    assert not (tmp_path / "out").exists()
