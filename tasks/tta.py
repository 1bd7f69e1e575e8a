"""Test-time adaptation: adapt to a target's unlabelled test split by composing the *other* data
sets' task vectors (aTLAS §4.3), with an unsupervised objective.

The labels of the test split are read by :meth:`TTATask.final` only: the search objective, the
trusted set and the pseudo-labels come from predictions. Augmented views of the test images are
drawn once in ``setup`` (seeded by the run) and passed through the frozen prefix, so every
evaluation is deterministic and runs only the tail.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness.api import Candidate, Evaluation, HarnessError, option
from harness.data.augment import augment
from harness.objective import ComposeOptions, ComposingTask, shard_slice
from harness.sources.base import host_array, scalar

OBJECTIVES = ("ufm", "entropy", "im", "simclr")
# How UFM turns the weak view's probabilities p into soft pseudo-labels, with s = ``sharpen``
# (see :func:`sharpen`): the paper's temperature, and the two released branches' variants.
SHARPEN_MODES = ("temperature", "power", "scale")
# A whole-set score under SAR's filter with no reliable sample is a mean over nothing: failed, not 0
# (0 would be the best loss, and the search would prefer the most uncertain model).
NO_RELIABLE = "no sample's entropy is below reliable × ln(classes): the filtered mean is over no sample"


# --------------------------------------------------------------------------- augmentation

def trusted_set(probs: Tensor, cap: int = 100, fraction: float = 1.0) -> tuple[Tensor, Tensor]:
    """The trusted samples of unsupervised FixMatch: per *predicted* class, the
    ``k = min(floor(fraction · N / C), cap)`` samples predicted as that class with the highest
    confidence (all of them if fewer are predicted as it).

    Args:
        probs: (N, C) class probabilities of the zero-shot model.
        cap: at most this many per class (the paper: 100).
        fraction: of the per-class share N / C (the paper: 1; the released code: 0.1).

    Returns:
        ``(indices, pseudo_labels)``: sorted sample indices and their predicted classes.

    Example:
        >>> trusted_set(torch.tensor([[.9, .1], [.6, .4], [.2, .8], [.3, .7]]), cap=1)
        (tensor([0, 2]), tensor([0, 1]))
    """
    n, c = probs.shape
    k = min(int(fraction * n / c), cap)
    conf, pred = probs.max(1)
    picks = []
    for cls in range(c):
        members = torch.nonzero(pred == cls).flatten()
        order = torch.argsort(conf[members], descending=True, stable=True)
        picks.append(members[order[:k]])
    idx = torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long)
    return idx, pred[idx]


def sharpen(probs: Tensor, temperature: float, mode: str = "temperature") -> Tensor:
    """Soft pseudo-labels from (N, C) probabilities ``p``, each row renormalised to sum to 1; ``s``
    is ``temperature`` (the task's ``sharpen`` option):

    - ``temperature`` (default; PAPER App. E / Eq. 16, MixMatch's sharpening): ``p^(1/s)``, with p
      clamped at 1e-12 first. s < 1 makes a distribution more peaked (s = 0.5 squares p), s = 1
      leaves it, s > 1 flattens it.
    - ``power`` (the released code's ``ssl`` branch, ``softmax ** 0.5``): ``p^s``, no clamp. s < 1
      *flattens* (s = 0.5 is the square root); ``power`` with s equals ``temperature`` with 1/s.
    - ``scale`` (the released code's ``main`` branch, ``softmax * 0.5``): ``s·p``, which the
      renormalisation undoes: the pseudo-labels are ``p`` (no sharpening, whatever s).

    Example (p = [.6, .3, .1], s = 0.5): temperature → p² / .46 = [.783, .196, .022];
    power → √p / 1.6385 = [.473, .334, .193]; scale → [.6, .3, .1].
    """
    if mode == "temperature":
        p = probs.clamp_min(1e-12) ** (1.0 / temperature)
    elif mode == "power":
        p = probs ** temperature
    elif mode == "scale":
        p = probs * temperature
    else:
        raise HarnessError(f"unknown sharpen_mode {mode!r}; valid: {', '.join(SHARPEN_MODES)}")
    return p / p.sum(1, keepdim=True)


def info_nce(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """Per-pair NT-Xent (SimCLR) loss of two views' L2-normalised features, (g, d) each: every one of
    the 2g embeddings must pick its partner among the other 2g − 1. Returns g losses (mean of the two)."""
    g = len(za)
    z = torch.cat([za, zb])
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * g, dtype=torch.bool, device=sim.device), float("-inf"))
    partner = torch.cat([torch.arange(g, 2 * g), torch.arange(g)]).to(sim.device)
    per = F.cross_entropy(sim, partner, reduction="none")
    return (per[:g] + per[g:]) / 2


def _entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def reliable(logits: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Per-sample prediction entropies and SAR's reliable-sample mask: a sample counts when its
    entropy is below ``margin`` · ln(classes) (SAR: 0.4); ``margin`` 0 keeps every sample.

    Example:
        >>> reliable(torch.tensor([[9.0, 0, 0], [0.0, 0, 0]]), 0.4)[1]
        tensor([ True, False])
    """
    e = _entropy(logits)
    if not margin:
        return e, torch.ones_like(e, dtype=torch.bool)
    return e, e.detach() < margin * float(np.log(logits.shape[1]))


# --------------------------------------------------------------------------- the task

class TTATask(ComposingTask):
    """Compose every data set's task vector except the target's; search on the target's test images
    without their labels; report test accuracy on those same images (transductive, as in the paper).

    Objectives (``objective``), each a weighted mean of per-sample terms so that data shards reduce
    exactly (``im`` excepted, below):

    - ``ufm`` (unsupervised FixMatch, the paper's): a trusted set is chosen once with the zero-shot
      model (:func:`trusted_set`: per predicted class the min(``trusted_fraction`` · N/C,
      ``trusted_cap``) most confident) and keeps its zero-shot pseudo-labels; every other sample
      gets soft pseudo-labels from the current model on its weak view, sharpened as
      ``sharpen_mode`` says with ``sharpen`` = s (below), and counts only if their largest entry
      exceeds ``threshold``.
      The loss is the cross-entropy of the strong view against the (detached) pseudo-labels, masked
      terms divided by the batch size as in FixMatch. Trusted samples carry ``trusted_share`` (¼)
      of every batch's weight, the others the rest.
    - ``entropy``: mean prediction entropy on the unaugmented images (Tent's objective); with
      ``reliable`` = m > 0, the mean over the samples whose entropy is below m · ln(classes) only
      (SAR's reliable-sample filter, m = 0.4), recomputed at every point scored.
    - ``im`` (the default): information maximisation (SHOT's objective) on the unaugmented images:
      mean prediction entropy minus the entropy of the mean prediction, so that predictions get
      confident *and* stay spread over the classes instead of collapsing onto a few. The second
      term is on the whole batch, so this objective is not split across data shards (Ray sends
      whole candidates, see :meth:`Task.shardable`).
    - ``simclr``: NT-Xent between two strong views' L2-normalised features, ``temperature``; the
      negatives of a sample are the others in its group of ``batch_size`` samples (fixed, seeded
      groups for whole-set scores; a gradient step's mini-batch is one group).

    UFM's sharpening of the weak-view probabilities p (``sharpen_mode``; each renormalised, see
    :func:`sharpen`). The paper (App. E, Eq. 16) sharpens with a temperature; the released code
    does otherwise in each of its branches, so each is offered by name:

    - ``temperature`` (the default, the paper's intent): p^(1/s). s = 0.5 squares p (more
      peaked); s = 1 is no sharpening.
    - ``power``: p^s, the released ``ssl`` branch (``softmax ** 0.5``); with s = 0.5 it takes the
      square root, which *flattens* p.
    - ``scale``: s·p, the released ``main`` branch (``softmax * 0.5``); renormalising undoes it, so
      the pseudo-labels are p itself, whatever s. (That branch's ``trusted_bool`` quirk, which
      marks every sample trusted, is not reproduced here.)

    Reported: ``acc`` (headline) and ``zero_shot_acc`` on the adapted test images, and their difference.

    Defaults: ``trusted_fraction`` 0.1 and ``threshold`` 0.99 are the released code's (read
    literally, min(N/C, 100) trusts most of a small test split, at a lower pseudo-label precision
    than a tenth of it). ``objective`` is ``im`` because self-training (``ufm``) and entropy
    minimisation alone can collapse the predictions onto a few classes, which information
    maximisation's diversity term prevents.
    """

    name = "tta"
    description = ("test-time adaptation: unlabelled target test split, other data sets' task vectors "
                   "(im|ufm|entropy|simclr)")
    selects_vectors = True
    headline = "acc"
    higher_is_better = True
    data = "unlabelled test"
    tunes_norms = True

    @dataclass
    class Options(ComposeOptions):
        target: str = option("animals", "data set to adapt to (its test split, unlabelled); every other data "
                                        "set's task vector is composed")
        objective: str = option("im", "unsupervised search loss: im (information maximisation), ufm (unsupervised "
                                      "FixMatch), entropy, or simclr", choices=OBJECTIVES)
        max_n: int = option(0, "adapt on a seeded subset of at most N test images (0: all)", ge=0)
        batch_size: int = option(128, "samples in a gradient step's mini-batch; simclr: also the group size of "
                                      "whole-set scores", ge=2)
        threshold: float = option(0.99, "ufm: an untrusted sample counts only if its sharpened pseudo-label's "
                                        "largest entry exceeds this", ge=0, lt=1)
        sharpen: float = option(0.5, "ufm: the s of sharpen_mode (temperature: p^(1/s), so 0.5 squares p; "
                                     "power: p^s; scale: s·p)", gt=0)
        sharpen_mode: str = option("temperature", "ufm pseudo-labels: temperature p^(1/s) (paper), power p^s "
                                                  "(released ssl branch), scale s·p = p (released main branch)",
                                   choices=SHARPEN_MODES)
        trusted_cap: int = option(100, "ufm: at most this many trusted samples per predicted class", ge=0)
        trusted_fraction: float = option(0.1, "ufm: trusted samples per predicted class, as a fraction of N / C "
                                              "(before trusted_cap)", ge=0, le=1)
        trusted_share: float = option(0.25, "ufm: the share of every batch's weight the trusted samples carry",
                                      ge=0, le=1)
        temperature: float = option(0.1, "simclr: temperature of the NT-Xent loss", gt=0)
        reliable: float = option(0.0, "entropy: average only over samples whose entropy is below this × ln(classes) "
                                      "(SAR's reliable-sample filter: 0.4; 0: every sample; below 1, since no "
                                      "entropy exceeds ln(classes); a whole-set score with no such sample fails)",
                                 ge=0, lt=1)
        flip: bool = option(True, "allow horizontal flips in the augmented views (off where mirroring changes "
                                  "the class)")

    @classmethod
    def validate(cls, options):
        super().validate(options)
        if options.reliable and options.objective != "entropy":
            raise HarnessError(f"task option reliable filters the entropy objective's samples (SAR); objective "
                               f"'{options.objective}' does not use it: drop -t reliable or use -t objective=entropy")

    def prepare(self):
        src, o = self.load_source(), self.options
        self.compose_others(o.target)
        n_all = len(src.inputs[o.target]["test"])
        self.idx = torch.arange(n_all)
        if 0 < o.max_n < n_all:
            gen = torch.Generator().manual_seed(self.seed * 7919 + 11)
            self.idx = torch.randperm(n_all, generator=gen)[:o.max_n].sort().values
        self.clean = src.inputs[o.target]["test"][self.idx]
        raw = src.images[o.target]["test"][self.idx.numpy()]
        rng = np.random.default_rng([self.seed, 2407_02880])
        n, self.zero = len(self.idx), np.zeros(self.comp.dim)
        if o.objective == "ufm":
            self.weak = src.encode(augment(raw, rng, "weak", o.flip))
            self.strong = src.encode(augment(raw, rng, "strong", o.flip))
            with torch.no_grad():
                probs = self._logits(self.params(self.zero, False)[0], self.clean).softmax(1)
            self.trusted, self.trusted_labels = trusted_set(probs, o.trusted_cap, o.trusted_fraction)
            mask = torch.ones(n, dtype=torch.bool)
            mask[self.trusted] = False
            self.untrusted = torch.nonzero(mask).flatten()
            nt, nu = len(self.trusted), len(self.untrusted)
            self._share = o.trusted_share if nt and nu else float(nt > 0)
        elif o.objective == "simclr":
            self.view_a = src.encode(augment(raw, rng, "strong", o.flip))
            self.view_b = src.encode(augment(raw, rng, "strong", o.flip))
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + 12))
            self.groups = list(order.split(o.batch_size))
        self._zs_acc = None

    def _logits(self, params, x):
        return self.source.logits(params, x, self.options.target)

    # ---- the objectives: each returns (sum of weighted per-sample losses, sum of weights, metrics)

    def _ufm(self, params, trusted: Tensor, untrusted: Tensor, w_t: float, w_u: float):
        o, parts, wsum, confident = self.options, [], 0.0, 0.0
        if len(trusted):
            labels = self.trusted_labels[torch.searchsorted(self.trusted, trusted)]
            parts.append(w_t * F.cross_entropy(self._logits(params, self.strong[trusted]), labels,
                                               reduction="sum"))
            wsum += w_t * len(trusted)
        if len(untrusted):
            logits = self._logits(params, torch.cat([self.weak[untrusted], self.strong[untrusted]]))
            weak, strong = logits[:len(untrusted)], logits[len(untrusted):]
            target = sharpen(weak.detach().softmax(1), o.sharpen, o.sharpen_mode)
            mask = (target.max(1).values > o.threshold).float()
            ce = -(target * F.log_softmax(strong, dim=1)).sum(1)
            parts.append(w_u * (mask * ce).sum())
            wsum += w_u * len(untrusted)
            # Scaled so that the reduced metric is the fraction of untrusted samples that count.
            confident = scalar(mask.sum()) * w_u / max(1 - self._share, 1e-12)
        return sum(parts), wsum, {"confident": confident}

    def _ufm_data(self, c: Candidate, shard):
        o, nt, nu = self.options, len(self.trusted), len(self.untrusted)
        share = self._share
        if c.batch is None:
            t, u = self.trusted, self.untrusted
        else:
            # The one sampler that draws with replacement: a batch keeps its trusted share even
            # when fewer samples are trusted than that share asks for (UFM's batch composition).
            gen = torch.Generator().manual_seed(c.batch)
            bt = round(o.batch_size * share)
            t = self.trusted[torch.randint(0, nt, (bt,), generator=gen)] if bt else self.trusted[:0]
            u = self.untrusted[torch.randint(0, nu, (o.batch_size - bt,), generator=gen)] if bt < o.batch_size \
                else self.untrusted[:0]
        # Per-sample weights: the trusted part carries `share` of the batch, the rest 1 - share.
        w_t, w_u = share / max(len(t), 1), (1 - share) / max(len(u), 1)
        return t[shard_slice(len(t), shard)], u[shard_slice(len(u), shard)], w_t, w_u

    def _simclr(self, params, groups: list[Tensor], n_total: int):
        if not groups:
            return 0, 0.0, {}
        idx = torch.cat(groups)
        za = F.normalize(self.source.features(params, self.view_a[idx]), dim=-1)
        zb = F.normalize(self.source.features(params, self.view_b[idx]), dim=-1)
        total, i = 0, 0
        for g in groups:
            total = total + info_nce(za[i:i + len(g)], zb[i:i + len(g)], self.options.temperature).sum()
            i += len(g)
        return total / n_total, len(idx) / n_total, {}

    def _im(self, params, idx: Tensor):
        """Information maximisation: mean per-sample entropy minus the entropy of the mean prediction."""
        logits = self._logits(params, self.clean[idx])
        mean_p = logits.softmax(1).mean(0)
        diversity = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return _entropy(logits).mean() - diversity, 1.0, {"diversity": scalar(diversity.detach())}

    @classmethod
    def shardable(cls, options) -> bool:
        # im's diversity term is on the mean prediction of the whole batch: shard losses are valid
        # losses of their own samples but do not average to the whole batch's.
        return options.objective != "im"

    def _batch(self, c: Candidate) -> Tensor:
        """All samples for a whole-set score, else a random mini-batch seeded by ``c.batch``."""
        n = len(self.idx)
        if c.batch is None:
            return torch.arange(n)
        return self.minibatch(n, self.options.batch_size, torch.Generator().manual_seed(c.batch))

    def evaluate(self, candidates: list[Candidate], shard=None):
        o, out = self.options, []
        for c in candidates:
            with torch.set_grad_enabled(c.grad):
                params, xt = self.params(c.x, c.grad)
                if o.objective == "ufm":
                    t, u, w_t, w_u = self._ufm_data(c, shard)
                    num, wsum, metrics = self._ufm(params, t, u, w_t, w_u)
                elif o.objective == "im":
                    # A shard is scored as a batch of its own (what a low-fidelity score needs); its
                    # results do not reduce exactly to the whole batch's, see shardable().
                    batch = self._batch(c)
                    num, wsum, metrics = self._im(params, batch[shard_slice(len(batch), shard)])
                elif o.objective == "entropy":
                    batch = self._batch(c)
                    idx = batch[shard_slice(len(batch), shard)]
                    if o.reliable:  # the mean over reliable samples: each weighs 1, a shard its count
                        e, keep = reliable(self._logits(params, self.clean[idx]), o.reliable) if len(idx) else (None, None)
                        num = (e * keep).sum() if len(idx) else 0
                        wsum = float(keep.sum()) if len(idx) else 0.0
                        # Recorded as the reliable fraction of the samples scored (metrics are divided by wsum).
                        metrics = {"reliable": wsum * wsum / len(idx)} if len(idx) else {}
                        if not wsum and c.batch is None and shard is None:  # a mean over no sample
                            out.append(Evaluation(loss=float("inf"), ok=False, error=NO_RELIABLE))
                            continue
                    else:  # each sample weighs 1 / batch size: a shard's weight is its share of the batch
                        num = _entropy(self._logits(params, self.clean[idx])).sum() / len(batch) if len(idx) else 0
                        wsum, metrics = len(idx) / len(batch), {}
                else:
                    groups = self.groups if c.batch is None else [self._batch(c)]
                    total = sum(len(g) for g in groups)
                    num, wsum, metrics = self._simclr(params, groups[shard_slice(len(groups), shard)], total)
                out.append(self._package(num, wsum, xt, c.grad, metrics))
        return out

    def _package(self, num, wsum: float, xt: Tensor, want_grad: bool, metrics: dict) -> Evaluation:
        """Weighted mean = weighted sum ÷ weight; an empty shard has weight 0 and a zero gradient."""
        metrics = {k: v / wsum for k, v in metrics.items()} if wsum else {k: 0.0 for k in metrics}
        if not wsum or not isinstance(num, Tensor):
            grad = np.zeros(self.comp.dim) if want_grad else None
            return Evaluation(loss=0.0, grad=grad, metrics=metrics, weight=0.0)
        loss = num / wsum
        grad = None
        if want_grad:
            loss.backward()
            grad = host_array(xt.grad)
        return Evaluation(loss=scalar(loss.detach()), grad=grad, metrics=metrics, weight=float(wsum))

    # ---- reporting (the only place test labels are read)

    def _acc(self, x) -> float:
        y = self.source.labels[self.options.target]["test"][self.idx]
        with torch.no_grad():
            params = self.params(x, False)[0]
            pred = torch.cat([self._logits(params, xb).argmax(1) for xb in self.clean.split(512)])
        return scalar((pred == y).float().mean())

    def final(self, x):
        if self._zs_acc is None:
            self._zs_acc = self._acc(self.zero)
        acc = self._acc(x)
        return {"acc": acc, "zero_shot_acc": self._zs_acc, "gain": acc - self._zs_acc}

    def references(self):
        return {"zero-shot": self.final(self.zero)}
