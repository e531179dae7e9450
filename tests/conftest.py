"""Shared test setup: two CPU threads and fixed seeds, so every test is deterministic."""

import random

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
