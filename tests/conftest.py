"""Shared test set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must
be set before any kernel is defined, so it is set here, before tests import
astra_kernels.triton. On a GPU machine the kernels compile for the device instead.

The header of every run says whether the compiled extension loaded and which backend
serves each op; tests of a backend that was built but does not load fail (see
``tests/_util.py``), they do not skip.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_report_header(config):
    import astra_kernels as ak
    info = ak.backend_info()
    served = ", ".join(f"{op}: {'/'.join(per_dev.values())}" for op, per_dev in info.items())
    return [f"astra_kernels._C: {ak.compiled_status()}",
            f"backends ({'/'.join(next(iter(info.values())))}): {served}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
