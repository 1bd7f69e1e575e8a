"""``python -m harness data check``: what a data root holds of a suite, against the paper.

Per data set: the convention found (``tv`` layout or ``hf`` Parquet) and where, the number of
classes, the train / val / test sizes after the reference validation split beside the paper's
Table 5, and, for a missing data set, the commands that fetch it on a machine with network.
A malformed layout stops the check with one line naming the file (exit 2); ``decode`` also
decodes every image, so a corrupt file is found before a run rather than during one.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.api import HarnessError
from harness.data import benchmark, hf_parquet
from harness.data.suites import spec, suite


@dataclass
class Row:
    name: str
    status: str            # found | missing | sizes differ
    convention: str = ""
    location: str = ""
    classes: int = 0
    sizes: dict | None = None
    paper: dict | None = None
    note: str = ""


class _Decode:
    """A DataLoader data set that decodes image i of ``samples`` and yields 0 (the check only
    needs the decode to succeed or to name the file)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        self.samples.open(i)
        return 0


def _decode_all(d: benchmark.BenchData, workers: int) -> int:
    """Decode every image of every split (in ``workers`` processes); returns how many."""
    import torch
    from harness.stream import iterate_loader
    n = 0
    for samples in d.splits.values():
        loader = torch.utils.data.DataLoader(_Decode(samples), batch_size=64, num_workers=workers)
        for batch in iterate_loader(loader):
            n += len(batch)
    return n


def check(names: list[str], root: str, *, convention: str = "auto", val_rule: str = "atlas",
          prompts: str = "atlas", decode: bool = False, workers: int = 2) -> list[Row]:
    """One :class:`Row` per data set; raises HarnessError for a malformed layout."""
    from harness.data import tv_layout
    rows = []
    for name in names:
        s = spec(name)
        if s is None:
            raise HarnessError(f"'{name}' is not a benchmark data set; see `python -m harness data suites`")
        if benchmark.find(name, root, convention) is None:
            hints = []
            if s.name in tv_layout.SUPPORTED:
                hints.append(f"tv: {tv_layout.fetch_hint(s.name)}")
            if s.hf:
                hints.append(f"hf: {hf_parquet.fetch_hint(s.name)}")
            rows.append(Row(name, "missing", note=" | ".join(hints) or "no reader for this data set yet"))
            continue
        d = benchmark.load(name, root, convention=convention, val_rule=val_rule, prompts=prompts)
        sizes = d.info["sizes"]
        paper = d.info["paper_sizes"]
        status = "found"
        note = ""
        if paper and sizes != paper:
            status = "sizes differ"
            note = "paper Table 5: " + " ".join(f"{k}={v}" for k, v in paper.items())
        if decode:
            note = (note + "; " if note else "") + f"decoded {_decode_all(d, workers)} images"
        rows.append(Row(name, status, d.convention, d.location, len(d.classes), sizes, paper, note))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.status == "missing":
            lines.append(f"{r.name:<18} MISSING  get it with: {r.note}")
            continue
        sizes = " ".join(f"{k}={v}" for k, v in (r.sizes or {}).items())
        lines.append(f"{r.name:<18} {r.status.upper():<12} {r.convention:<3} {r.classes:>4} classes  "
                     f"{sizes}  {r.location}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def names_for(suite_name: str | None, datasets: str | None) -> list[str]:
    """The data sets a check covers: ``datasets`` (comma-separated), else the suite's."""
    if datasets:
        return [d.strip() for d in datasets.split(",") if d.strip()]
    if suite_name:
        return suite(suite_name)
    raise HarnessError("data check needs --suite NAME or --datasets A,B")
