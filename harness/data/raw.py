"""What a benchmark data reader returns: a data set's splits as :class:`Samples`, before the
reference protocol's validation split is made (:mod:`harness.data.benchmark`)."""
from __future__ import annotations

from dataclasses import dataclass

from harness.data.samples import Samples


@dataclass
class RawData:
    """One benchmark data set as found on disk.

    Attributes:
        name: the data set's :class:`harness.data.suites.Spec` name (``Cars``).
        convention: ``tv`` (the task_vectors / aTLAS layout) or ``hf`` (Hugging Face Parquet).
        location: the folder it was read from.
        splits: ``train`` and ``test``, plus ``val`` for data sets that ship their own.
        classes: class names read from the files (e.g. Cars' ``cars_meta.mat``), in label
            order; None where the layout carries none (the prompt lists supply them).
    """

    name: str
    convention: str
    location: str
    splits: dict[str, Samples]
    classes: list[str] | None = None
