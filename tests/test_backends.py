"""Backend selection: import never fails, overrides work, `astra info` tells the truth."""
import os
import subprocess
import sys

import pytest
import torch

import astra_kernels as ak


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_import_falls_back_when_compiled_part_is_missing():
    # sys.modules[name] = None makes `import astra_kernels._C` raise ImportError,
    # exactly as a missing or incompatible .so does.
    res = _python(
        "import sys, warnings; sys.modules['astra_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import astra_kernels as ak, torch\n"
        "    info = ak.backend_info()\n"
        "    c = ak.vq_encode(torch.randn(5, 8), torch.randn(2, 3, 4))\n"
        "print(len([x for x in w if 'compiled kernels unavailable' in str(x.message)]))\n"
        "print(info['vq_encode']['cpu'], tuple(c.shape), ak.compiled_status())\n")
    assert res.returncode == 0, res.stderr
    count, line = res.stdout.strip().splitlines()
    assert count == "1"  # warned once
    assert line.startswith("reference (5, 2) not loaded: ModuleNotFoundError")


@pytest.mark.skipif("cpp" not in ak.available_backends("cpu"), reason="compiled kernels not built")
def test_compiled_kernels_serve_cpu_by_default_and_env_overrides():
    assert all(v["cpu"] == "cpp" for v in ak.backend_info().values())
    res = _python("import astra_kernels as ak; print(ak.backend_info()['mixed_attention']['cpu'])",
                  ASTRA_CPU_BACKEND="reference")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"


def test_use_backend_switches_and_restores():
    before = ak.backend_info()["pack_codes"]["cpu"]
    with ak.use_backend("reference"):
        assert ak.backend_info()["pack_codes"]["cpu"] == "reference"
    assert ak.backend_info()["pack_codes"]["cpu"] == before


def test_unknown_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown Astra backend 'fast'"):
        with ak.use_backend("fast"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' was requested"):
            with ak.use_backend("cuda", "cpu"):
                pass


def test_astra_info_lists_every_op_with_its_backend():
    res = subprocess.run([sys.executable, "-m", "astra.cli", "info"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = ak.backend_info()
    for op, per_dev in info.items():
        line = next(l for l in res.stdout.splitlines() if l.startswith(op))
        assert line.split()[1] == per_dev["cpu"]
    assert "torch " + torch.__version__ in res.stdout
