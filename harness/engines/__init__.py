"""Engines: what turns candidates into losses on a device (see :class:`harness.api.Engine`).

``local`` (:mod:`harness.engines.local`) is the built-in one: merge, chunked forward, and a
population (vmap) pass chosen by measurement. Engines are plugins (entry-point group
``harness.engines``); a task picks one with ``-t engine=NAME``.
"""
from __future__ import annotations

import re

import torch

from harness.api import Evaluation, HarnessError
from harness.sources.base import host_array, scalar

_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device(spec: str) -> str:
    """``spec`` if this machine can compute on it, else a HarnessError naming what is valid here.

    Valid forms: ``cpu``, ``cuda``, ``cuda:N``. (Tests of the device plumbing set tasks up on
    ``meta``, where tensors have shapes but no values, directly; a run never records one.)
    """
    spec = str(spec).strip()
    if not _DEVICE.fullmatch(spec) or spec.startswith("cpu:"):
        raise HarnessError(f"unknown device {spec!r}; valid forms: cpu, cuda, cuda:N")
    if spec.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        here = "cpu" + "".join(f", cuda:{i}" for i in range(n))
        if n == 0:
            raise HarnessError(f"device {spec!r} asked for, but CUDA is not available here "
                               f"(torch {torch.__version__}, no usable GPU); valid devices here: {here}")
        if ":" in spec and int(spec.split(":")[1]) >= n:
            raise HarnessError(f"device {spec!r} does not exist; valid devices here: {here}")
    return spec


def package(loss: torch.Tensor, weight: float, xt: torch.Tensor, want_grad: bool, metrics: dict) -> Evaluation:
    """An Evaluation of a (weighted-mean) loss, on the host: backpropagates to the coefficients
    when a gradient is wanted and copies loss and gradient off the device."""
    grad = None
    if want_grad:
        loss.backward()
        grad = host_array(xt.grad)
    return Evaluation(loss=scalar(loss.detach()), grad=grad, metrics=metrics, weight=float(weight))
