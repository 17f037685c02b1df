"""Backend selection: import never fails, overrides work, `astra info` tells the truth;
the decision is cached; every op namespace carries the schemas of ``ops.SCHEMAS``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import astra_kernels as ak
from astra_kernels import _backends


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120, check=False)


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
    with pytest.raises(ValueError, match="unknown Astra backend 'fast'"), ak.use_backend("fast"):
        pass
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' was requested"), \
                ak.use_backend("cuda", "cpu"):
            pass


def test_astra_info_lists_every_op_with_its_backend():
    res = subprocess.run([sys.executable, "-m", "astra.cli", "info"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    info = ak.backend_info()
    for op, per_dev in info.items():
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(op))
        assert line.split()[1] == per_dev["cpu"]
    assert "torch " + torch.__version__ in res.stdout


# ------------------------------------------------------------------ one schema list

# Helpers of the compiled extension, defined in C++ next to their code; not ops.
_C_HELPERS = {"has_cuda", "vq_cache_clear", "vq_cache_stats", "vq_bf16_fast_available"}


def _ops_in(namespace: str) -> set:
    prefix = namespace + "::"
    return {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith(prefix)}


def _args(schema) -> list:
    return [(a.name, str(a.type), repr(a.default_value), a.kwarg_only) for a in schema.arguments]


def _returns(schema) -> list:
    return [str(r.type) for r in schema.returns]


def _schema(namespace: str, op: str):
    return getattr(getattr(torch.ops, namespace), op).default._schema


def _want(op: str):
    return torch._C.parse_schema(ak.ops.SCHEMAS[op])


def test_astra_namespace_is_exactly_the_schema_list():
    assert _ops_in("astra") == set(ak.ops.SCHEMAS)
    for op in ak.ops.SCHEMAS:
        got, want = _schema("astra", op), _want(op)
        assert (_args(got), _returns(got)) == (_args(want), _returns(want)), op


@pytest.mark.skipif("cpp" not in ak.available_backends("cpu"), reason="compiled kernels not built")
def test_compiled_namespace_has_the_same_schemas():
    assert _ops_in("astra_C") - _C_HELPERS == set(ak.ops.SCHEMAS)
    for op in ak.ops.SCHEMAS:
        got, want = _schema("astra_C", op), _want(op)
        assert (_args(got), _returns(got)) == (_args(want), _returns(want)), op
    for helper in _ops_in("astra_C") & _C_HELPERS:  # helpers take no tensors
        assert not _schema("astra_C", helper).arguments, helper


def test_triton_namespace_has_the_same_schemas():
    pytest.importorskip("triton")
    from astra_kernels import triton as tk
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("this torch has no triton_op")
    assert _ops_in("astra_triton") == set(tk.IMPLS) and set(tk.IMPLS) <= set(ak.ops.SCHEMAS)
    for op in tk.IMPLS:
        got, want = _schema("astra_triton", op), _want(op)
        n = len(want.arguments)
        assert _args(got)[:n] == _args(want) and _returns(got) == _returns(want), op
        extra = _args(got)[n:]  # launcher-only options after the common arguments
        assert extra == ([("remote_path", "str", "'auto'", False)]
                         if op == "mixed_attention" else []), op


@pytest.mark.skipif("cpp" not in ak.available_backends("cpu"), reason="compiled kernels not built")
def test_a_kernel_that_disagrees_with_its_schema_is_refused():
    """The check ``ops.define_compiled`` relies on: the dispatcher compares a kernel's C++
    signature with a schema defined after it."""
    res = _python(
        "import glob, os, torch, astra_kernels\n"
        "from torch.library import Library\n"
        "so = glob.glob(os.path.join(os.path.dirname(astra_kernels.__file__), '_C*.so'))[0]\n"
        "torch.ops.load_library(so)\n"
        "try:\n"
        "    Library('astra_C', 'FRAGMENT').define('pack_codes(Tensor c, float bits) -> Tensor')\n"
        "except RuntimeError as e:\n"
        "    print('refused' if 'mismatch' in str(e) else e)\n",
        ASTRA_DISABLE_C="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "refused"


def test_csrc_writes_no_op_schema():
    """The C++ sources define only helpers; op schemas come from ops.SCHEMAS."""
    root = Path(__file__).resolve().parents[1] / "csrc"
    for path in root.rglob("*"):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            text = path.read_text()
            for op in ak.ops.SCHEMAS:
                assert f'def("{op}(' not in text, f"{path} defines {op}'s schema"


# ------------------------------------------------------------ cached backend decision

@pytest.fixture
def count_choices(monkeypatch):
    """Record every (op, device type, requested) the backend chooser is asked for."""
    calls = []
    real = _backends._choose

    def spy(op, device_type, want):
        calls.append((op, device_type, want))
        return real(op, device_type, want)

    monkeypatch.setattr(_backends, "_choose", spy)
    monkeypatch.delenv("ASTRA_CPU_BACKEND", raising=False)
    ak.reset_backend_cache()
    yield calls
    ak.reset_backend_cache()


def test_backend_decision_is_made_once_per_op_and_device(count_choices):
    codes = torch.randint(0, 16, (2, 5), dtype=torch.int32)
    for _ in range(20):
        ak.unpack_codes(ak.pack_codes(codes, 4), (2, 5), 4)
    assert sorted(count_choices) == [("pack_codes", "cpu", None), ("unpack_codes", "cpu", None)]
    before = ak.backend_info()["pack_codes"]["cpu"]
    assert ("pack_codes", "cpu", None) not in count_choices[2:]  # info reuses the decision
    count_choices.clear()
    with ak.use_backend("reference"):  # clears the cache: decides again, for reference
        for _ in range(5):
            ak.pack_codes(codes, 4)
        assert ak.backend_info()["pack_codes"]["cpu"] == "reference"
    assert count_choices.count(("pack_codes", "cpu", "reference")) == 1
    count_choices.clear()
    ak.pack_codes(codes, 4)  # leaving the block cleared it again
    assert count_choices == [("pack_codes", "cpu", None)]
    assert ak.backend_info()["pack_codes"]["cpu"] == before


def test_env_override_is_read_when_the_cache_is_filled(count_choices, monkeypatch):
    codes = torch.randint(0, 16, (7,), dtype=torch.int32)
    ak.pack_codes(codes, 4)
    default = ak.backend_info()["pack_codes"]["cpu"]
    monkeypatch.setenv("ASTRA_CPU_BACKEND", "reference")
    ak.reset_backend_cache()
    assert ak.backend_info()["pack_codes"]["cpu"] == "reference"
    for _ in range(5):
        ak.pack_codes(codes, 4)
    assert count_choices.count(("pack_codes", "cpu", "reference")) == 1
    monkeypatch.setenv("ASTRA_CPU_BACKEND", "fast")
    ak.reset_backend_cache()
    for _ in range(2):  # an unusable request is not cached: every call raises
        with pytest.raises(ValueError, match="unknown Astra backend 'fast'"):
            ak.pack_codes(codes, 4)
    monkeypatch.delenv("ASTRA_CPU_BACKEND")
    ak.reset_backend_cache()
    assert ak.backend_info()["pack_codes"]["cpu"] == default
