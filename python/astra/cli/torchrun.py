"""The entry each host runs under ``torchrun``: every rank builds the same job from the
same options (those of ``astra run``, :func:`astra.cli.run.add_job_args`)::

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 \\
        --master_addr 10.0.0.1 --master_port 29511 \\
        -m astra.cli.torchrun --model gpt2 --strategy astra --tokens 1024

The link is real (no emulation). Rank 0 prints the median latency and its bytes sent.
``--strategy auto``: every rank measures its own speed first and the chunks follow the
measured speeds (all ranks take part: the world is torchrun's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import List, Optional

from ..options import STRATEGIES
from . import Parser, run_command
from ._args import add_timeout
from .run import add_job_args


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m astra.cli.torchrun", description=__doc__.splitlines()[0])
    add_job_args(p, STRATEGIES + ("auto",))
    add_timeout(p, 60.0)
    p.add_argument("--output", metavar="PATH.pt",
                   help="rank 0 saves the run's output tensor here (torch.save)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    from astra import catalog
    from astra.parallel.runner import Job, check_device
    from astra.parallel.worker import run_jobs
    check_device(args.device, ["wall"])
    rank = int(os.environ.get("RANK", "0"))
    # auto here: astra with chunks sized to the speeds the ranks measure (the world is
    # torchrun's: every rank takes part)
    auto = args.strategy == "auto"
    astra = args.strategy in ("astra", "auto")
    # codebooks made here (neither --codebooks nor --checkpoint): rank 0 makes them and
    # sends them to the others once, so hosts never disagree by construction
    shared = astra and not args.codebooks and not args.checkpoint
    run = catalog.load(args.model, args.tokens, args.codebooks, args.checkpoint,
                       with_codebooks=astra and (rank == 0 or not shared))
    job = Job("astra" if auto else args.strategy, run.inputs, wire=args.wire,
              codebooks=run.codebooks, output="compact", link=None, link_mode="none",
              repeats=args.repeats, warmup=1, timeout_s=args.timeout)
    r = run_jobs(dict(model=run.spec, jobs=[job], threads=1, device=args.device,
                      share_codebooks=shared, measure_speeds=auto))[0]
    if rank == 0:
        if auto:
            print(f"measured speeds {', '.join(f'{s:.2f}' for s in r['measured_speeds'])}: "
                  f"chunks {','.join(map(str, r['chunks']))}")
        shared_b = (f"; codebooks sent by rank 0 once: {r['shared_codebooks_bytes']:,} B"
                    if r.get("shared_codebooks_bytes") else "")
        print(f"median {statistics.median(r['times']) * 1e3:.1f} ms, "
              f"{statistics.median(r['bytes_sent']):.0f} B sent by rank 0; handshake "
              f"{r['handshake']['bytes']:.0f} B, {r['handshake']['seconds'] * 1e3:.0f} ms"
              + shared_b)
        if args.output:
            torch.save(r["output"], args.output)
    return 0


def entry(argv: Optional[List[str]] = None) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    return run_command(args, f"rank {os.environ.get('RANK', '?')}")


if __name__ == "__main__":
    # parsed before the worker (torch) is imported: a bad option is one line, exit 2, at once
    parsed = build_parser().parse_args(sys.argv[1:])
    from astra.parallel.worker import exit_now
    exit_now(_run, parsed)
