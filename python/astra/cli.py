"""The ``astra`` command line.

Subcommands import their heavy dependencies lazily, so ``astra info`` stays quick.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:  # a broken optional package must not break `astra info`
        return f"not available ({type(e).__name__})"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, the compiled extension's state and the backend serving each op."""
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
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Microbenchmarks: each op beside its anchors, one run, medians."""
    from astra.bench import kernels
    cases = args.cases.split(",") if args.cases else None
    if cases:
        unknown = sorted(set(cases) - set(kernels.CASE_NAMES))
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(kernels.CASE_NAMES)}")
    return kernels.main(args.device, args.json, args.quick, cases)


# Subcommands that live next to their code: each module has ``add_parser(subparsers)``
# that adds its parser and sets ``func``. Import must stay cheap (no torch models).
SUBCOMMAND_MODULES: List[str] = ["astra.evaluate", "astra.finetune", "astra.parallel.cli",
                                   "astra.demo"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astra", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    s = sub.add_parser("info", help="versions and which backend serves each op here")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("bench", help="benchmarks")
    bsub = s.add_subparsers(dest="suite", required=True)
    k = bsub.add_parser("kernels", help="op microbenchmarks beside their anchors (faiss, SDPA, cdist)")
    k.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    k.add_argument("--quick", action="store_true", help="shorter timing loops")
    k.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    k.add_argument("--cases", help="comma-separated subset of case names")
    k.set_defaults(func=cmd_bench)
    from astra.parallel.cli import add_bench_parser
    add_bench_parser(bsub)
    from astra.bench.accuracy import add_parser as add_accuracy_parser
    add_accuracy_parser(bsub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
