"""Shared fixtures. Heavy things (zoos, Ray) are built once per test session."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests and Ray workers share the machine.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A zoo cache for the whole session (small zoos are built into it on first use)."""
    path = os.environ.get("ATLAS_HARNESS_TEST_CACHE") or str(tmp_path_factory.mktemp("zoo-cache"))
    return path
