"""The runner with GPU ranks (``launch(..., device="cuda")``, ``astra run --device cuda``).

Every rank computes on a GPU (rank r on GPU ``r % count``: on a one-GPU machine all
ranks share it), the frames still travel as host bytes over gloo. On CUDA: the outputs
equal the single-process simulation on the CPU for a causal and a non-causal model,
and the baselines equal the single-device model. Everywhere: asking for CUDA where
there is none, or for the virtual clock with GPU ranks, fails clearly.
"""
import subprocess
import sys

import pytest
import torch

from astra import catalog
from astra.catalog import factories
from astra.parallel.runner import Job, ModelSpec, default_chunks, launch
from tests._util import HAS_CUDA, requires_cuda
from tests.test_runner import G, K, _reference


def _case(factory, world, x):
    spec = ModelSpec(factory)
    model = spec.build()
    with torch.no_grad():
        cb = catalog.quick_codebooks(model, x, G=G, K=K)
    ref, sim = _reference(model, x, cb, world)
    # the simulation's split for the causal model (the runner's default is cost-balanced)
    eq = default_chunks(x.shape[1], world) if factory is factories.tiny_gpt2 else None
    jobs = [Job("astra", x, codebooks=cb, chunks=eq, name="astra"), Job("sp", x, name="sp"),
            Job("tp", x, name="tp"), Job("single", x, name="single")]
    res = launch(spec, jobs, world, device="cuda")
    return ref, sim, dict(zip([j.name for j in jobs], res))


@requires_cuda
@pytest.mark.parametrize("factory,world,x", [
    (factories.tiny_gpt2, 2, torch.randint(0, 97, (2, 23),
                                           generator=torch.Generator().manual_seed(0))),
    (factories.tiny_bert, 3, torch.randint(0, 97, (2, 24),
                                           generator=torch.Generator().manual_seed(0))),
    (factories.tiny_hf_vit, 3, torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))),
], ids=["gpt2-N2", "bert-N3", "hfvit-N3"])
def test_gpu_ranks_equal_the_cpu_simulation(factory, world, x):
    ref, sim, res = _case(factory, world, x)
    out = res["astra"][0]["output"]
    assert out.device.type == "cpu"  # outputs come back on the host
    torch.testing.assert_close(out, sim, rtol=1e-4, atol=1e-4)
    for name in ("sp", "tp", "single"):
        torch.testing.assert_close(res[name][0]["output"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where CUDA is missing")
def test_cuda_ranks_without_cuda_fail_clearly():
    # refused in the parent, before any rank starts
    x = torch.randint(0, 97, (1, 12))
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        launch(ModelSpec(factories.tiny_gpt2), [Job("single", x)], 2, device="cuda",
               startup_timeout_s=60)


def test_gpu_ranks_refuse_the_virtual_clock():
    p = subprocess.run([sys.executable, "-m", "astra.cli", "run", "--model", "tiny-gpt2",
                        "--device", "cuda", "--clock", "virtual"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "--clock virtual counts CPU time" in p.stderr
