"""Class-name and prompt-template lists behind :mod:`harness.data.prompts`, read from
``prompt_lists.json`` beside this module: data, kept out of the code.

Each list in the JSON has ``items`` and ``source``, the place in the reference code it was copied
from. The lists were extracted once from the reference sources with Python's ``ast`` module (no
downloaded code was run). Short names used in the sources:

- TV = mlfoundations/task_vectors@826a64c67082fab0f40628233287948f0f8d7fa3:src/datasets/
- AT = fredzzhang/atlas@557d7fbd61a28fc85f8463b2fd522706d8e4e980:src/datasets/
- fusion_bench==0.2.33 = fusion_bench==0.2.33:fusion_bench/tasks/clip_classification/ (wheel sha256
  cf34d2d969073eea0ac49a85d0c2429ceeff12781a71fc5e639844db5412253d)

Templates are format strings: the source's ``lambda c: f'...{c}...'`` with ``{c}`` replaced by
``{}``. Every list is a module attribute of the same name, as a tuple (``CARS_CLASSES``, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

_LISTS = json.loads((Path(__file__).with_name("prompt_lists.json")).read_text(encoding="utf-8"))
SOURCES: dict[str, str] = {name: entry["source"] for name, entry in _LISTS.items()}
globals().update({name: tuple(entry["items"]) for name, entry in _LISTS.items()})
