"""``astra info``: versions, the compiled extension's state and the backend per op."""
from __future__ import annotations

import argparse
import importlib
import platform
import textwrap


def register(sub) -> None:
    s = sub.add_parser("info", help="versions and which backend serves each op here")
    s.set_defaults(func=main)


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:  # a broken optional package must not break `astra info`
        return f"not available ({type(e).__name__})"


def main(args: argparse.Namespace) -> int:
    import torch

    import astra_kernels as ak

    print(f"astra {ak.__version__} on Python {platform.python_version()}, {platform.machine()}")
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; CPU capability {cap}; "
          f"{torch.get_num_threads()} threads)")
    for mod in ("triton", "transformers", "timm", "numpy", "faiss"):
        print(f"{mod:<13}{_version(mod)}")
    if torch.cuda.is_available():
        print(f"GPU          {torch.cuda.get_device_name(0)}")
    else:
        print("GPU          none visible")
    print(f"astra_kernels._C: {ak.compiled_status()}")
    info = ak.backend_info()
    devices = list(next(iter(info.values())))
    print()
    print(f"{'op':<18}" + "".join(f"{d:<12}" for d in devices))
    for op, per_dev in info.items():
        print(f"{op:<18}" + "".join(f"{per_dev[d]:<12}" for d in devices))
    print()
    print(textwrap.fill(
          "mixed_attention paths: remote keys gathered from the projected tables (every "
          "model), or attention in codebook space (G = 1: remote tokens sharing a code are "
          "one key) for models without RoPE only. A rotated key depends on its position, "
          "so with RoPE (the Llama family) every backend gathers and rotates each remote "
          "key.", 88))
    return 0
