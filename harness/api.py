"""The seams of the harness: what searchers, tasks, model sources and engines provide.

Five kinds of plugins, each found through its own entry-point group:

- a *searcher* (``harness.searchers``) proposes coefficient vectors and learns from their scores;
- a *task* (``harness.tasks``) is an objective: which data sets and splits, the task vectors'
  signs, the per-sample loss, the final metrics and references. A composing task does not build
  a model: it asks a source for one and an engine to score candidates on it;
- a *model source* (``harness.sources``) builds θ0, the task vectors, the frozen heads and the
  inputs (a :class:`harness.sources.ModelSource`), and knows nothing about objectives or searchers;
- an *engine* (``harness.engines``) turns candidates into losses (and gradients) on a device:
  merge, forward, chunking, sequential or population evaluation;
- a *transform* (``harness.transforms``) rewrites the task vectors before they are composed
  (TIES trimming and sign election, DARE drop-and-rescale, Iso-C's flat spectrum).

The runner (``harness.runner``) joins a searcher and a task; neither knows about the other.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from harness.errors import HarnessError
from harness.options import check_options, constraint_text, option
from harness.outputs import Outputs  # noqa: F401 (part of the plugin contract)

__all__ = ["Candidate", "Engine", "Evaluation", "HarnessError", "Plugin", "Searcher", "Source", "Space", "Task",
           "Transform", "check_options", "constraint_text", "option"]


@dataclass
class Space:
    """A box of coefficient vectors.

    Args:
        dim: number of coefficients.
        lower, upper: bounds (scalars or arrays of length ``dim``).
        start: where searchers start (aTLAS starts at 0, the pre-trained model).
        labels: optional name per coordinate, e.g. ``"fashion/blocks.13.conv.weight"``.
        kind: the parametrisation, e.g. ``per_block`` (informative only).
    """

    dim: int
    lower: Any = -1.5
    upper: Any = 1.5
    start: np.ndarray | None = None
    labels: list[str] | None = None
    kind: str = "flat"

    def __post_init__(self):
        self.lower = np.broadcast_to(np.asarray(self.lower, dtype=np.float64), (self.dim,)).copy()
        self.upper = np.broadcast_to(np.asarray(self.upper, dtype=np.float64), (self.dim,)).copy()
        self.start = (np.zeros(self.dim) if self.start is None
                      else np.asarray(self.start, dtype=np.float64).reshape(self.dim).copy())

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lower, self.upper)


@dataclass
class Candidate:
    """One coefficient vector to evaluate.

    Args:
        x: the coefficients.
        grad: whether the gradient of the loss w.r.t. ``x`` is wanted.
        batch: ``None`` scores on the task's whole search set; an integer seeds a random mini-batch.
        fidelity: fraction of the search set to score on (1.0 = all of it).
        outputs: whether the per-sample outputs (:class:`Outputs`) are wanted with the loss.
        anchor: a hint that the next candidates differ from this one in few coefficients (an
            engine may keep its activations: :mod:`harness.engines.prefix`); never changes a score.
        id: set by :meth:`Searcher.ask`, unique within one searcher (never ``id(x)``, which Python reuses).
    """

    x: np.ndarray
    grad: bool = False
    batch: int | None = None
    fidelity: float = 1.0
    outputs: bool = False
    anchor: bool = False
    id: int | None = None


@dataclass
class Evaluation:
    """The score of one candidate. ``loss`` is minimised; ``weight`` is the number of samples
    it was computed on, so shard results can be reduced into an exact weighted mean."""

    loss: float
    grad: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0
    ok: bool = True
    error: str = ""
    outputs: Outputs | None = None  # asked for with Candidate(outputs=True); never recorded in the trace


class Plugin:
    """Shared by searchers and tasks: a name, a one-line description and typed options.

    Subclasses set ``Options`` to a dataclass; ``-s key=value`` / ``-t key=value`` are parsed
    against its fields, and an unknown key is an error."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    @classmethod
    def validate(cls, options) -> None:
        """Raise HarnessError for option values that can never work (checked before a run starts)."""

    @classmethod
    def option_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Options)}


class Searcher(Plugin):
    """Batch ask/tell optimiser over a :class:`Space`, written as a template.

    The public verbs do the bookkeeping once: :meth:`ask` numbers the candidates (``Candidate.id``),
    :meth:`tell` keeps the best whole-set score so far (``best_x``, ``best_loss``: ok evaluations
    with ``batch=None`` and ``fidelity=1``), :meth:`recommend` falls back to that best point, and
    the constructor validates the options. A subclass fills in :meth:`_ask` (and usually
    :meth:`_tell`; :meth:`_recommend` when its answer is not the best point scored).
    A subclass that overrides ``ask``/``tell``/``recommend`` themselves still works.

    Capabilities are class flags: ``needs_gradient`` (asks for candidates with ``grad=True``),
    ``max_batch`` (largest useful batch; ``None`` = any), ``default_space`` (the composition
    granularity used when the user does not choose one), ``default_budget`` (evaluations) and
    ``default_batch`` (candidates per ask) used when the run does not set them. Warm start and
    screening (``-s warm=K``, ``-s screen=F -s finalists=K``) are wrappers the harness puts around
    any searcher (:mod:`harness.wrappers`), not options of the searcher itself.
    """

    needs_gradient: ClassVar[bool] = False
    needs_outputs: ClassVar[bool] = False  # asks for Candidate(outputs=True): tasks must return Outputs
    max_batch: ClassVar[int | None] = None
    default_space: ClassVar[str] = "per_block"
    default_budget: ClassVar[int] = 200
    default_batch: ClassVar[int] = 1
    # A fixed reference (zero-shot, task arithmetic) rather than an optimiser: the conformance
    # suite checks it never does worse than the start instead of expecting it to find the optimum.
    reference: ClassVar[bool] = False
    # False for a searcher whose answer ignores every score (zero-shot): it touches no data.
    uses_scores: ClassVar[bool] = True
    # True for a searcher that can be asked while earlier candidates are unscored and told scores
    # one at a time in any order: it can run pipelined (``--parallel async``).
    asynchronous: ClassVar[bool] = False
    # The task-vector transform this searcher is the baseline of (``ties``): the planner sets the
    # task's ``transform`` option to it (or checks that the one given has this name).
    transform: ClassVar[str] = ""

    @classmethod
    def budget_for(cls, options) -> int:
        """The budget of a run that sets none: ``default_budget`` unless the options imply one
        (the task-arithmetic grid's ``points``)."""
        return cls.default_budget

    def __init__(self, space: Space, budget: int, batch_size: int, seed: int, options):
        check_options("searcher", options)  # also when a searcher is built directly, not planned
        type(self).validate(options)
        self.space, self.budget, self.batch_size, self.seed, self.options = space, budget, batch_size, seed, options
        self.info: dict[str, Any] = {}  # facts worth recording, e.g. the optimiser NGOpt chose
        self.reproducible: bool = True  # False: proposals do not follow the seed (no replay, no resume)
        self.best_x, self.best_loss = space.start.copy(), float("inf")
        self._next_id = 0

    def candidate(self, x, **kw) -> Candidate:
        """A new numbered :class:`Candidate` (use it where the id is needed before :meth:`ask` returns)."""
        c = Candidate(x=x, **kw)
        c.id, self._next_id = self._next_id, self._next_id + 1
        return c

    def ask(self, n: int) -> list[Candidate]:
        """Up to ``n`` candidates (at least one while the search goes on; none ends the run)."""
        out = self._ask(n)
        for c in out:
            if c.id is None:
                c.id, self._next_id = self._next_id, self._next_id + 1
        return out

    def tell(self, candidates: list[Candidate], evaluations: list[Evaluation]) -> None:
        """Learn from the scores of candidates returned by :meth:`ask`."""
        for c, e in zip(candidates, evaluations):
            if e.ok and c.batch is None and c.fidelity >= 1 and e.loss < self.best_loss:
                self.best_x, self.best_loss = np.asarray(c.x, dtype=np.float64).copy(), e.loss
        self._tell(candidates, evaluations)

    def recommend(self) -> np.ndarray:
        """The coefficients this searcher would report now."""
        return np.asarray(self._recommend(), dtype=np.float64)

    def _ask(self, n: int) -> list[Candidate]:
        raise NotImplementedError(f"{type(self).__name__} implements neither _ask nor ask")

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]) -> None:
        """Subclass hook; the best point is already tracked."""

    def _recommend(self) -> np.ndarray:
        """The best whole-set point told so far (the space's start before any)."""
        return self.best_x.copy()

    def close(self) -> None:
        """Release resources (threads, files); called by the runner when the search ends."""


class Task(Plugin, ABC):
    """A benchmark: builds its model and data in :meth:`setup`, defines the space and the loss.

    ``evaluate`` scores on the search split (validation, shots or unlabelled data); ``final``
    reports on the held-out split. ``headline`` names the metric leaderboards rank by and
    ``higher_is_better`` its direction.
    """

    headline: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    data: ClassVar[str] = "none"  # what learning reads: "labelled validation", "few labelled train shots", ...

    @classmethod
    def data_for(cls, options) -> str:
        """:attr:`data` for these options (a task whose objective can change what it reads overrides it)."""
        return cls.data
    composes: ClassVar[bool] = False  # composes task vectors (so ``--space`` applies, checked up front)
    minibatch_outputs: ClassVar[bool] = False  # Outputs also for candidates on a mini-batch (no whole-set term)

    @classmethod
    def returns_outputs(cls, options) -> bool:
        """Whether whole-set candidates with ``outputs=True`` come back with :class:`Outputs`."""
        return False

    def __init__(self, options, space: str = "per_block", seed: int = 0, cache_dir: str | None = None):
        self.options, self.space_kind, self.seed, self.cache_dir = options, space, seed, cache_dir
        # Facts the task learns while it runs (e.g. which evaluation path measured faster); recorded.
        self.task_info: dict[str, Any] = {}

    @classmethod
    def shardable(cls, options) -> bool:
        """Whether ``evaluate(..., shard=(i, k))`` splits the search data so that shard results
        reduce exactly (a weighted mean). A loss that is not a mean over samples (a term on the
        batch's mean prediction) returns False; Ray then sends whole candidates to workers."""
        return True

    @abstractmethod
    def setup(self, device: str = "cpu") -> None:
        """Build everything expensive (model, task vectors, cached inputs). Called once per process."""

    @classmethod
    def check_space(cls, options, space: str) -> None:
        """Raise HarnessError when the options cannot work with ``--space`` (checked before a run)."""

    def after_setup(self) -> dict:
        """Called after :meth:`setup` in every process that evaluates (runner, Ray workers), e.g. to
        drop task vectors; returns facts to keep in the run record."""
        return {}

    @abstractmethod
    def space(self) -> Space:
        """The coefficient space (valid after :meth:`setup`)."""

    def learnable_parameters(self, searched: bool) -> int:
        """How many parameters a run learns (recorded, and shown in leaderboards): the coordinates of
        the space when the searcher scores candidates (``searched``), else none."""
        return int(self.space().dim) if searched else 0

    def data_touched(self, searched: bool) -> str:
        """What a run reads to learn (recorded): :meth:`data_for` when ``searched``, else none."""
        return type(self).data_for(self.options) if searched else "none"

    @abstractmethod
    def evaluate(self, candidates: list[Candidate], shard: tuple[int, int] | None = None) -> list[Evaluation]:
        """Score candidates on the search split. ``shard=(i, n)`` scores only the i-th of n
        disjoint parts of the data, with ``weight`` set to its sample count."""

    @abstractmethod
    def final(self, x: np.ndarray) -> dict[str, float]:
        """Metrics of coefficients ``x`` on the held-out split; must contain ``headline``."""

    def complete(self, candidate: Candidate, evaluation: Evaluation) -> Evaluation:
        """Called once per candidate on its whole-set result (after shards are reduced): the place
        for terms that are not sums over samples, e.g. a penalty on an accuracy. Default: as is."""
        return evaluation

    def references(self) -> dict[str, dict[str, float]]:
        """Reference results (e.g. zero-shot, fine-tuned) printed beside a run; optional."""
        return {}

    def constraint_ok(self, metrics: dict[str, float]) -> bool:
        """Whether a final result satisfies the task's constraint (negation's control floor)."""
        return True
    # What the runner records about a built task (called once, in the runner, after setup).

    def provenance(self) -> dict:
        """The plugins the task used besides itself (``{"source": {...}, "engine": {...}}``, as
        :func:`harness.registry.provenance` gives them) and ``family``: hashes of the checkpoints
        it composed, so runs on different checkpoints never pool. ``{}`` for a task without any."""
        return {}

    def setup_facts(self) -> dict:
        """Facts of the setup for the run record (caches hit, inputs held or streamed); top-level fields."""
        return {}

    def expand(self, x: np.ndarray) -> np.ndarray | None:
        """``x`` as one coefficient per task vector and block (saved, and drawn by ``plot``); ``None``
        for a task that composes no task vectors."""
        return None

    def task_vector_names(self) -> list[str] | None:
        """The names of the composed task vectors, in the order of :meth:`expand`'s rows."""
        return None


class Source(Plugin, ABC):
    """A model source plugin: builds a :class:`harness.sources.ModelSource` (θ0 as ``base``, one
    task vector per data set, frozen heads, cached inputs and labels per split) on the CPU.

    ``Options`` are set with ``-t source_options="key=value;key=value"``. Fields named ``model``,
    ``pretrained``, ``checkpoints`` or ``data_root`` also receive the task options of the same
    name (``-t checkpoints=...``), so a user's files reach the source without the task knowing it.
    ``cached`` sources (the built-in zoos) are built once and cached; ``python -m harness zoo``
    builds and describes them.
    """

    cached: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def load(cls, options, *, cache_dir: str | None = None, progress: bool = True):
        """Build (or load from a cache) and return the ModelSource, on the CPU."""


class Engine(Plugin, ABC):
    """Turns candidates into losses on a device, for a composing task.

    An engine holds a model source and a composition (θ0 and the stacked task vectors), moved to
    its device once in ``__init__``. The task hands it candidates with a search set and a
    per-sample loss; the engine merges, runs the forward pass (chunked, sequentially or as a
    population) and returns Evaluations whose numbers are on the host. ``info`` holds what it
    chose (recorded with the run).
    """

    def __init__(self, source, composition, device: str, options):
        self.source, self.comp, self.device, self.options = source, composition, device, options
        self.info: dict[str, Any] = {}

    @abstractmethod
    def params(self, x, grad: bool):
        """Merged parameters for coefficients ``x`` and the tensor gradients flow to (None without grad)."""

    @abstractmethod
    def score(self, candidates: list[Candidate], data, shard=None, regularizer=None) -> list[Evaluation]:
        """The weighted mean cross-entropy (and accuracy) of each candidate on ``data``."""

    @abstractmethod
    def accuracy(self, x, ds: str, split: str = "test") -> float:
        """Top-1 accuracy of coefficients ``x`` on one split of the source."""

    # What composing tasks call besides score (the built-in tasks use all of them).

    @abstractmethod
    def to(self, device) -> "Engine":
        """Move the source and the composition to ``device`` once; returns the engine."""

    @abstractmethod
    def weighted_ce(self, candidate: Candidate, data, shard=None, regularizer=None) -> Evaluation:
        """One candidate's weighted mean cross-entropy (and accuracy) on shard ``shard`` of
        ``data`` (a :class:`harness.objective.WeightedSet`), plus ``regularizer(coefficients)``;
        with the gradient when ``candidate.grad``. The unit :meth:`score` is made of."""

    @abstractmethod
    def per_sample_ce(self, params, names: list[str], xs: list, ys: list) -> tuple[list, list]:
        """Per-sample cross-entropy and correctness of each data set's inputs ``xs`` (labels
        ``ys``) under merged parameters ``params`` (from :meth:`params`), each through its own
        head: two lists of tensors, one per data set. For losses that are not a plain weighted
        mean (negation's target and control terms, entropy objectives)."""


class Transform(Plugin):
    """Rewrites the task vectors a composing task composes, before any searcher sees them.

    ``-t transform=NAME:k=v,...`` picks the plugin and its ``Options``. :meth:`apply` maps the T
    task vectors (already signed by the task) to the vectors the task composes instead. Contract:
    the *plain sum* of the returned vectors is the method's merged task vector, so task arithmetic
    over them (``α·1``) is the classic data-free method, and every searcher can learn anisotropic
    coefficients over them. A transform may return fewer vectors (Iso-C returns one).
    """

    def __init__(self, options):
        self.options = options

    def apply(self, task_vectors: list[dict], names: list[str], seed: int) -> tuple[list[dict], list[str], dict]:
        """``(vectors, their names, info recorded with the run)``; the inputs are not modified.
        Random transforms draw only from generators seeded by ``seed`` (the run's)."""
        raise NotImplementedError
