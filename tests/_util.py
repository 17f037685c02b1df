"""Helpers shared by the tests (import as ``from tests._util import ...``)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
