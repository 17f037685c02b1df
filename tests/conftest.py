"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must
be set before any kernel is defined, so it is set here, before tests import
astra_kernels.triton. On a GPU machine the kernels compile for the device instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
