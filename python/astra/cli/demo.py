"""``astra demo``: the main job (MiniLM on 4 emulated devices over 10 Mbit/s against
single / tp / sp)."""
from __future__ import annotations

import argparse

from ._args import positive_int


def register(sub) -> None:
    from astra.demo import DEVICES
    p = sub.add_parser("demo", help="MiniLM on 4 emulated devices over 10 Mbit/s vs single/tp/sp")
    p.add_argument("--devices", type=positive_int, default=DEVICES)
    p.add_argument("--plot", default="astra-demo.png", metavar="PATH.png")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from astra.demo import run
    run(args.devices, plot_path=args.plot, json_path=args.json)
    return 0
