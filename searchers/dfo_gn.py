"""Derivative-free Gauss-Newton: trust-region steps on a finite-difference model of the logits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.api import Candidate, Evaluation, HarnessError, Searcher, option
from atlas_harness_searchers.coarse_to_fine import groups_of


class DfoGnSearcher(Searcher):
    """A model-based derivative-free search that models the network's outputs, not its loss.

    The loss of a composed model is a known, cheap function (cross-entropy) of its logits on the
    search set, and the logits move smoothly with the coefficients. So, at an anchor point λ, the
    searcher probes each coefficient once (``λ + h·e_i``: one forward pass each, ``dim`` real
    evaluations of the budget) and takes the differences of the logits as a linear model
    ``z(λ + s) ≈ z(λ) + J·s``. It then minimises the task's own loss of the modelled logits
    inside a trust region (``max|s_i| ≤ radius``, or ``‖s‖ ≤ radius`` with ``region=ball``; and the
    task's box), scores that one point on the
    real model, and keeps it if the loss fell. The ratio of the real to the modelled decrease
    grows or shrinks the radius, as in every trust-region method; a rejected step is retried
    with a smaller radius on the same model, an accepted one starts the next round of probes.

    The network is only ever run forward: this is a black-box method for the coefficients, in
    the family of derivative-free Gauss-Newton methods for least squares (Cartis & Roberts 2019),
    with cross-entropy in place of the squared residuals. The modelled problem is small and
    smooth, so it is minimised with autograd (projected Adam) on the model itself. One round
    costs ``dim + 1`` evaluations; the first step from the pre-trained model is already the
    minimiser of a first-order model of every logit, which is why few rounds are needed.

    ``coarse_rounds=K`` makes the first K rounds coarse: one probe per group of coefficients (task
    vector × layer by default), the model and the step over one offset per group. Such a round
    costs ``groups + 1`` evaluations, so a few of them move the whole composition cheaply before
    the rounds over every coefficient refine it. A round the budget cannot finish is never used:
    its probes are spent without a step, so a budget that ends on a trial step
    (``1 + K·(groups + 1) + R·(dim + 1)``, one more per rejected step) wastes nothing.

    It needs a task that returns its outputs (addition, few_shot, negation; see
    :meth:`harness.api.Task.returns_outputs`); probes of a batch are independent, so ``--batch-size``
    (and Ray workers) score them in parallel.
    """

    name = "dfo-gn"
    description = ("derivative-free Gauss-Newton: finite-difference model of the logits, trust-region steps "
                   "(forward passes only)")
    needs_outputs = True
    default_budget = 800
    default_batch = 1
    default_space = "per_block"

    @dataclass
    class Options:
        step: float = option(0.05, "finite-difference step h of each probe λ + h·e_i (towards the box's inside "
                                   "at its edge, at most the room the box leaves)", ge=1e-6)
        radius: float = option(0.5, "initial trust-region radius (max-norm of a step)", gt=0)
        max_radius: float = option(1.5, "largest trust-region radius", gt=0)
        inner_steps: int = option(300, "projected Adam steps minimising the modelled loss in each trust region", ge=1,
                                  le=100_000)
        region: str = option("box", "shape of the trust region: box (max-norm: every coefficient may move by the "
                                    "radius) or ball (Euclidean norm: the whole step is at most the radius, which "
                                    "keeps many-coefficient steps on few samples small)", choices=("box", "ball"))
        inner: str = option("adam", "how the model is minimised in the region: adam (projected Adam to the region's "
                                    "minimiser) or flow (inner_steps normalised gradient steps of radius/inner_steps "
                                    "along the model's steepest descent: the path gradient descent would take, "
                                    "at most the radius long)", choices=("adam", "flow"))
        refresh: float = option(1.0, "share of the coefficients probed again in each round after the first: those "
                                     "that moved most since their last probe; the others keep their columns of the "
                                     "model from earlier rounds (1: probe all, the full round)", gt=0, le=1)
        minibatch: bool = option(False, "score each round (anchor, probes, trial steps) on a fresh mini-batch of the "
                                        "task's batch_size samples, seeded per round; the start and the answer (the "
                                        "budget's first and last evaluations) on the whole search set, and the "
                                        "better of them is recommended (false: every candidate on the whole set)")
        coarse: str = option("per_layer", "the grouping of the coarse rounds: each probe moves one group of "
                                          "coefficients together (per_task: one group per task vector; per_layer: "
                                          "per task vector and layer)", choices=("per_task", "per_layer"))
        coarse_rounds: int = option(0, "rounds at the start that model and step in the coarse grouping (one probe "
                                       "per group, so a round costs a fraction of a full one) before the rounds "
                                       "over every coefficient", ge=0, le=10_000)

    @classmethod
    def validate(cls, options):
        if options.radius > options.max_radius:
            raise HarnessError(f"searcher option radius ({options.radius}) must be at most max_radius "
                               f"({options.max_radius})")
        if options.coarse_rounds and options.refresh < 1:
            raise HarnessError("searcher option refresh < 1 keeps model columns of one coefficient each, which "
                               "coarse rounds do not measure; with coarse_rounds > 0 set refresh=1")
        if options.minibatch and options.refresh < 1:
            raise HarnessError("searcher option refresh < 1 keeps model columns from earlier rounds, which were "
                               "measured on other mini-batches; with minibatch=true set refresh=1")

    def __init__(self, space, budget, batch_size, seed, options):
        super().__init__(space, budget, batch_size, seed, options)
        self.lower, self.upper = np.asarray(space.lower, float), np.asarray(space.upper, float)
        self.anchor = space.clip(np.asarray(space.start, float))
        self.anchor_loss = np.inf
        self.anchor_out = None  # Outputs of the anchor, once scored
        self.radius = options.radius
        self.J = None
        self.queue: list[tuple[str, int, np.ndarray]] = []  # (kind, coordinate, x) still to ask this round
        self.waiting: dict[int, tuple[str, int]] = {}  # candidate id → ("anchor"|"probe"|"trial", coordinate)
        self.steps: dict[int, float] = {}
        self.trial_pred = 0.0
        self.info = {"rounds": 0, "trials": 0, "accepted": 0, "radius": self.radius}
        self.J_prev = None  # the last round's model, whose columns refresh < 1 keeps
        self.moved = np.zeros(space.dim)  # how far each coefficient moved since its last probe
        self.round_batch = None  # the mini-batch seed of this round (minibatch=true)
        self.asked = 0
        self.groups = groups_of(space.labels, space.dim, options.coarse)
        self.B = None  # directions of this round's probes (coordinates when None)
        self._start_round()

    # ------------------------------------------------------------------ the rounds

    def _start_round(self):
        """Queue the anchor (when its outputs are not known yet) and one probe per coordinate."""
        self.J = None
        self.queue = []
        if self.options.minibatch:  # a new mini-batch: the anchor is scored again on it
            self.round_batch = self.seed * 1_000_003 + self.info["rounds"]
            self.anchor_out = None
        if self.anchor_out is None:
            self.queue.append(("anchor", -1, self.anchor.copy()))
        dim = self.space.dim
        coarse = self.info["rounds"] < self.options.coarse_rounds
        if coarse:  # one 0/1 direction per group
            self.B = np.eye(int(self.groups.max()) + 1)[self.groups]
        else:
            self.B = None
        coords = range(self.B.shape[1] if coarse else dim)
        if self.J_prev is not None and self.options.refresh < 1:  # the most moved first; stable, so ties by index
            coords = sorted(np.argsort(-self.moved, kind="stable")[:int(np.ceil(self.options.refresh * dim))])
        if not coarse:
            self.moved[list(coords)] = 0
        for i in coords:
            d = self.B[:, i] if coarse else np.eye(1, dim, i)[0]
            on = d != 0
            h = self.options.step
            up, down = np.min((self.upper - self.anchor)[on]), np.min((self.anchor - self.lower)[on])
            if h > up:  # towards the box's inside; never further than the box leaves room for
                h = -min(h, down) if down >= up else up
            if h == 0:  # a coordinate the box pins: no probe, a zero column
                continue
            x = self.anchor + h * d
            self.steps[i] = h
            self.queue.append(("probe", i, x))
        self.probed: dict[int, np.ndarray] = {}
        self.info["rounds"] += 1

    def _trial(self) -> np.ndarray:
        """The minimiser of the modelled loss in the trust region, as the next candidate."""
        out = self.anchor_out
        z0 = torch.as_tensor(out.flat(), dtype=torch.float64)
        J = torch.as_tensor(self.J, dtype=torch.float64)
        r = self.radius
        lo, hi = np.maximum(self.lower - self.anchor, -r), np.minimum(self.upper - self.anchor, r)
        if self.B is not None:  # a group moves by one offset, which every member's box must allow
            on = self.B.T != 0
            lo = np.where(on, lo, -np.inf).max(axis=1)
            hi = np.where(on, hi, np.inf).min(axis=1)
        lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
        n = len(lo)
        # Adam's steps are about lr per coordinate: a ball's radius is shared by all of them.
        lr = r / 20 if self.options.region == "box" else r / 20 / np.sqrt(n)
        s = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([s], lr=lr)
        base = float(out.loss(z0))
        best_s, best_m = torch.zeros_like(s), base
        flow = self.options.inner == "flow"
        for _ in range(self.options.inner_steps):
            opt.zero_grad()
            m = out.loss(z0 + s @ J)
            if float(m.detach()) < best_m:
                best_m, best_s = float(m.detach()), s.detach().clone()
            if flow:  # a step of length radius / inner_steps down the model's gradient
                g = torch.autograd.grad(m, s)[0]
                with torch.no_grad():
                    s -= (r / self.options.inner_steps) * g / max(float(g.norm()), 1e-30)
                    s.copy_(torch.maximum(torch.minimum(s, hi), lo))
                continue
            m.backward()
            opt.step()
            with torch.no_grad():
                if self.options.region == "ball":  # onto the ball, then into the box (both convex)
                    s.mul_(min(1.0, r / max(float(s.norm()), 1e-30)))
                s.copy_(torch.maximum(torch.minimum(s, hi), lo))
        with torch.no_grad():
            m = float(out.loss(z0 + s @ J))
        if m < best_m:
            best_m, best_s = m, s.detach().clone()
        self.trial_pred = base - best_m
        self.info["trials"] += 1
        step = best_s.numpy() if self.B is None else self.B @ best_s.numpy()
        return np.clip(self.anchor + step, self.lower, self.upper)

    def _ask(self, n):
        left = self.budget - self.asked
        if self.options.minibatch:
            # The start and the answer (the budget's last evaluation) are scored on the whole
            # search set, so the answer recommended is never worse there than the start.
            if left <= 1 or (self.asked == 0 and left > 2):
                self.asked += 1
                return [self.candidate(self.anchor.copy())]
            n = min(n, left - 1)
        if self.queue:
            batch, self.queue = self.queue[:n], self.queue[n:]
        else:
            if self.J is None:  # every probe told: build the model
                base = self.anchor_out.flat()
                n = self.space.dim if self.B is None else self.B.shape[1]
                kept = self.J_prev if self.J_prev is not None and len(self.J_prev) == n else np.zeros((n, len(base)))
                self.J = np.stack([(self.probed[i] - base) / self.steps[i] if i in self.probed else kept[i]
                                   for i in range(n)])
            batch = [("trial", -1, self._trial())]
        out = []
        for kind, i, x in batch:
            # Probes start from the anchor's activations.
            c = self.candidate(x, outputs=True, anchor=kind != "probe", batch=self.round_batch)
            self.waiting[c.id] = (kind, i)
            out.append(c)
        self.asked += len(out)
        return out

    def _tell(self, candidates: list[Candidate], evaluations: list[Evaluation]):
        for c, e in zip(candidates, evaluations):
            if c.id not in self.waiting:  # the answer's whole-set score (minibatch): tracked by tell
                continue
            kind, i = self.waiting.pop(c.id)
            if e.ok and e.outputs is None:
                raise HarnessError("searcher dfo-gn asked for the task's outputs and got none: the task does not "
                                   "return them (tasks that do: addition, few_shot, negation)")
            if kind == "anchor":
                if not e.ok:
                    raise HarnessError("searcher dfo-gn: the start point's loss is not finite; nothing to model from")
                self.anchor_loss, self.anchor_out = e.loss, e.outputs
            elif kind == "probe":
                # A failed probe (non-finite) leaves that coefficient out of the model this round.
                self.probed[i] = e.outputs.flat() if e.ok else self.anchor_out.flat()
            else:
                self._after_trial(c, e)

    def _after_trial(self, c: Candidate, e: Evaluation):
        real = self.anchor_loss - e.loss if e.ok else -np.inf
        rho = real / self.trial_pred if self.trial_pred > 1e-12 else -np.inf
        accepted = e.ok and e.loss < self.anchor_loss
        if rho > 0.75:
            self.radius = min(2 * self.radius, self.options.max_radius)
        elif rho < 0.25:
            self.radius /= 4
        if accepted:
            self.moved += np.abs(np.asarray(c.x, float) - self.anchor)
            self.anchor, self.anchor_loss, self.anchor_out = np.asarray(c.x, float), e.loss, e.outputs
            self.info["accepted"] += 1
        self.info["radius"] = self.radius
        # A new model around the new anchor; after a rejection the same model with a smaller
        # region, unless the region has collapsed (then the model is rebuilt with fresh probes).
        if accepted or self.radius < 1e-3 * self.options.radius:
            # A kept model's columns are of this anchor's neighbourhood; a collapse probes them all.
            self.J_prev = self.J if accepted else None
            if not accepted:
                self.radius = self.options.radius / 4
            self._start_round()

    def _recommend(self) -> np.ndarray:
        # With mini-batches only the answer is scored on the whole set; before that, the anchor.
        if self.options.minibatch and not np.isfinite(self.best_loss):
            return self.anchor.copy()
        return self.best_x.copy()
