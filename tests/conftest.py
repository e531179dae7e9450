"""Shared test setup: two CPU threads and fixed seeds, so every test is deterministic, and a
measurement cache ($KILN_CACHE) of the test session's own, so a developer's cached peaks and
kernel choices neither steer the tests nor get written by them."""

import os
import random

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _own_kiln_cache(tmp_path_factory):
    before = os.environ.get("KILN_CACHE")
    os.environ["KILN_CACHE"] = str(tmp_path_factory.mktemp("session-kiln-cache"))
    yield
    if before is None:
        os.environ.pop("KILN_CACHE", None)
    else:
        os.environ["KILN_CACHE"] = before
