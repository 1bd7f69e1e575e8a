"""``python -m harness convert``: any supported checkpoint layout → plain safetensors in the
harness's (open_clip's) layout, with a manifest, so later runs load fast and never unpickle.

Inputs: a pre-trained model (a Hugging Face ``CLIPModel`` folder, an open_clip state dict, a
paper-style whole pickled model) and fine-tuned checkpoints (``CLIPVisionModel`` folders, PEFT LoRA
adapter folders, open_clip state dicts, whole pickled models), as ``NAME=PATH``. Outputs in
``--out``: ``model/`` (an open_clip ``local-dir:`` folder, for Hugging Face input) or
``pretrained.safetensors``, one ``NAME.safetensors`` per fine-tune, and ``manifest.json`` (what was
read, with sha256, and what was written). Use them with ``-t pretrained=... -t checkpoints=OUT``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from harness.api import HarnessError


def _sha256(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.name.encode())
            h.update(bytes.fromhex(_sha256(f)))
        return h.hexdigest()
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_checkpoints(pretrained: str, checkpoints: list[tuple[str, str]], out: str) -> dict:
    """Convert and write; returns the manifest."""
    from harness.checkpoints import is_pickled_module, load_state_dict, save_state_dict
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"--out {out} exists and is not a folder")
    for _, p in [("pretrained", pretrained)] + checkpoints:
        if not os.path.exists(p):
            raise HarnessError(f"checkpoint not found: {p}")
    out_dir.mkdir(parents=True, exist_ok=True)
    read = [{"role": "pretrained", "path": os.path.abspath(pretrained), "sha256": _sha256(Path(pretrained))}]
    read += [{"role": name, "path": os.path.abspath(p), "sha256": _sha256(Path(p))} for name, p in checkpoints]
    if os.path.isfile(os.path.join(pretrained, "config.json")):
        from harness.sources.hf_clip import convert
        local, paths = convert(pretrained, checkpoints, out_dir)
        fmt, written = "hugging face", [local] + paths
        use = f"-t pretrained={local} -t checkpoints=" + ",".join(f"{n}={p}" for (n, _), p in zip(checkpoints, paths))
    else:
        written = []
        for name, p in [("pretrained", pretrained)] + checkpoints:
            target = out_dir / f"{name}.safetensors"
            save_state_dict(load_state_dict(p), target)
            written.append(str(target))
        fmt = "pickled model" if any(is_pickled_module(p) for p in [pretrained] + [p for _, p in checkpoints]) \
            else "torch state dict"
        use = f"-t pretrained={written[0]} -t checkpoints=" + ",".join(
            f"{n}={w}" for (n, _), w in zip(checkpoints, written[1:]))
    manifest = {"format_read": fmt, "read": read, "written": written, "use": use}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
