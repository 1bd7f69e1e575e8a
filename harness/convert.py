"""``python -m harness convert``: any supported checkpoint layout → plain safetensors in the
harness's (open_clip's) layout, with a manifest, so later runs load fast and never unpickle.

Inputs: a pre-trained model (a Hugging Face ``CLIPModel`` folder, an open_clip state dict, a
paper-style whole pickled model) and fine-tuned checkpoints (``CLIPVisionModel`` folders, PEFT LoRA
adapter folders, open_clip state dicts, whole pickled models), as ``NAME=PATH``. Outputs in
``--out``: ``model/`` (an open_clip ``local-dir:`` folder, for Hugging Face input) or
``pretrained.safetensors``, one ``NAME.safetensors`` per fine-tune, and ``manifest.json`` (what was
read, with sha256, and what was written). Use them with ``-t pretrained=... -t checkpoints=OUT``.

Everything is written into a hidden sibling folder (``.OUT.converting-PID-XXXX``), flushed to disk
and renamed onto ``--out`` only once complete, so ``--out`` holds either the previous conversion
or the new one, never a mix. A non-empty ``--out`` is replaced only with ``replace=True``
(``--replace``): it is renamed aside, the new folder renamed into place, then the old one deleted.
On any error the partial folder is removed; a process killed mid-way leaves only the hidden
``.converting-`` folder, which has no ``manifest.json``.

Checkpoint names become file names, so they must be plain names (:func:`check_names`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from harness.api import HarnessError
from harness.filecheck import RESERVED, check_names  # noqa: F401

def _sha256(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.name.encode())
            h.update(bytes.fromhex(_sha256(f)))
        return h.hexdigest()
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_input(path: str) -> None:
    """An input must be a regular file or a folder (reading a FIFO or device would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise HarnessError(f"checkpoint not found: {path}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise HarnessError(f"checkpoint {path} is not a regular file or folder (a FIFO, socket or device)")


def _inside(path: str, folder: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder``) to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def _move_into_place(new: Path, target: Path) -> None:
    """Rename the complete folder ``new`` onto ``target`` (absent, empty or to be replaced)."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(new, target)  # onto nothing or an empty folder: one atomic rename
        return
    old = target.parent / f".{target.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert_checkpoints(pretrained: str, checkpoints: list[tuple[str, str]], out: str,
                        replace: bool = False) -> dict:
    """Convert into ``out`` (written aside, then renamed into place) and return the manifest.

    Raises:
        HarnessError: a bad name or input, a non-empty ``out`` without ``replace``, or a folder
            that cannot be written (``out`` is then left as it was).
    """
    from harness.checkpoints import WriteFailed, is_pickled_module, load_state_dict, save_state_dict
    check_names([name for name, _ in checkpoints])
    target = Path(os.path.realpath(out)) if os.path.islink(out) else Path(os.path.abspath(out))
    if target.exists() and not target.is_dir():
        raise HarnessError(f"--out {out} exists and is not a folder")
    try:
        occupied = target.is_dir() and any(target.iterdir())
    except OSError as e:
        raise HarnessError(f"--out {out} cannot be read: {e.strerror or e}") from None
    if occupied and not replace:
        raise HarnessError(f"--out {out} is not empty; pass --replace to replace it (the old contents are "
                           "replaced only once the new conversion is complete)")
    for _, p in [("pretrained", pretrained)] + checkpoints:
        _check_input(p)
        if target.is_dir() and _inside(p, target):
            raise HarnessError(f"checkpoint {p} is inside --out {out}, which the conversion replaces; "
                               "convert into another folder")
    read = [{"role": "pretrained", "path": os.path.abspath(pretrained), "sha256": _sha256(Path(pretrained))}]
    read += [{"role": name, "path": os.path.abspath(p), "sha256": _sha256(Path(p))} for name, p in checkpoints]

    def failed(reason: str) -> HarnessError:
        return HarnessError(f"cannot write the converted files into {out}: {reason} (read-only folder or full "
                            f"disk?); {out} was left as it was")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.converting-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise failed(e.strerror or str(e)) from None

    def final(path: str) -> str:  # where a file written under tmp will be once renamed
        return str(Path(out) / Path(path).relative_to(tmp))

    try:
        if os.path.isfile(os.path.join(pretrained, "config.json")):
            from harness.sources.hf_clip import convert
            local, paths = convert(pretrained, checkpoints, tmp)
            fmt = "hugging face"
            local = "local-dir:" + final(local[len("local-dir:"):])
            paths = [final(p) for p in paths]
            written = [local] + paths
            use = f"-t pretrained={local} -t checkpoints=" + ",".join(
                f"{n}={p}" for (n, _), p in zip(checkpoints, paths))
        else:
            written = []
            for name, p in [("pretrained", pretrained)] + checkpoints:
                save_state_dict(load_state_dict(p), tmp / f"{name}.safetensors")
                written.append(final(str(tmp / f"{name}.safetensors")))
            fmt = "pickled model" if any(is_pickled_module(p) for p in [pretrained] + [p for _, p in checkpoints]) \
                else "torch state dict"
            use = f"-t pretrained={written[0]} -t checkpoints=" + ",".join(
                f"{n}={w}" for (n, _), w in zip(checkpoints, written[1:]))
        manifest = {"format_read": fmt, "read": read, "written": written, "use": use}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        _move_into_place(tmp, target)
        _fsync_dir(target.parent)
    except WriteFailed as e:
        raise failed(e.reason) from None
    except OSError as e:
        raise failed(e.strerror or str(e)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
