"""Checks on a user's files before they are read or written: a regular file (a FIFO would block),
a zip that claims no more than its size allows, names that are safe as file names, and a short
one-line reason from any exception. The lowest layer of the checkpoint readers
(:mod:`harness.checkpoints`, :mod:`harness.unpickle`, :mod:`harness.sources.hf_clip`) and of
``convert``, so none of them imports another for these."""
from __future__ import annotations

import os
import re
import stat
import zipfile

from harness.api import HarnessError

# Boilerplate lines of torch's weights-only message that say nothing about this file.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def one_line(e: BaseException, limit: int = 160) -> str:
    """A short single-line reason from an exception message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_BOILERPLATE)] or lines or [type(e).__name__]
    text = " ".join(lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Size bounds that every checkpoint torch or safetensors writes meets and that a crafted file
# ("a few kilobytes that claim gigabytes") does not. torch.save stores zip members uncompressed
# (ZIP_STORED), so they add up to less than the file itself; a zip whose members claim more than
# _MAX_EXPANSION times the file's size plus _SLACK_BYTES is refused before anything is read from it.
# A tensor must address only elements inside its storage and have no more elements than it, and
# all tensors of one file together at most _MAX_EXPANSION times the bytes of the storages they view
# plus _SLACK_BYTES (tied weights view one storage twice; a bomb views it a thousand times).
_MAX_EXPANSION = 4
_SLACK_BYTES = 16 << 20


def check_regular_file(path: str | os.PathLike, what: str = "checkpoint") -> int:
    """The size of ``path``, which must be a regular file (a FIFO, socket or device would block
    or never end when read); a one-line error otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HarnessError(f"{what} not found: {path}") from None
    except OSError as e:
        raise HarnessError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise HarnessError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise HarnessError(f"{what} {path} is not a regular file (a FIFO, socket or device); "
                           "pass the file itself")
    return st.st_size


def check_zip_bounds(path: str, size: int) -> None:
    """Refuse a zip (torch's file format) whose members claim more bytes than its size allows
    (see ``_MAX_EXPANSION``); files that are not zips pass."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return  # not a (readable) zip: torch's own reader says what is wrong
    claimed = sum(i.file_size for i in infos)
    bound = _MAX_EXPANSION * size + _SLACK_BYTES
    if claimed > bound:
        packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
        how = f" ({len(packed)} compressed members; torch.save stores them uncompressed)" if packed else ""
        raise HarnessError(f"checkpoint {path} was refused: its zip members claim {claimed} bytes, more than "
                           f"{_MAX_EXPANSION}x its {size} bytes plus {_SLACK_BYTES >> 20} MiB{how}; "
                           "re-save it with torch.save or as safetensors")


# Names of what convert writes besides the fine-tunes (pretrained.safetensors, model/, manifest.json).
RESERVED = ("pretrained", "model", "manifest")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def check_names(names: list[str]) -> None:
    """Checkpoint names that are safe as file names in one folder: letters, digits, ``_``, ``-``
    and ``.`` (not first), at most 100 characters, none reserved (:data:`RESERVED`), no two equal
    (ignoring case, as some file systems do). A one-line error otherwise."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise HarnessError(f"checkpoint name {name!r} is not a plain name: use letters, digits, '_', '-' "
                               "and '.' (not first), at most 100 characters, as in NAME=PATH")
        if name.lower() in RESERVED:
            raise HarnessError(f"checkpoint name {name!r} is reserved for what convert writes besides the "
                               f"fine-tunes ({', '.join(RESERVED)}); name the checkpoint otherwise")
        if name.lower() in seen:
            same = "" if seen[name.lower()] == name else f" (as {seen[name.lower()]!r}; case is ignored)"
            raise HarnessError(f"checkpoint name {name!r} is given twice{same}; give each NAME=PATH its own name")
        seen[name.lower()] = name
