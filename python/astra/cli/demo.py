"""``astra demo``: the main job. SmolLM2 answers a long question across 4 emulated devices
over 10 Mbit/s against one device, the int8 baselines and llama.cpp; ``--model minilm``:
MiniLM sentence embeddings against single / tp / sp."""
from __future__ import annotations

import argparse

from ._args import positive_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="SmolLM2 answers a long question on 4 emulated devices "
                       "over 10 Mbit/s (--model minilm: sentence embeddings)")
    p.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    p.add_argument("--devices", type=positive_int, default=4)
    p.add_argument("--plot", default="astra-demo.png", metavar="PATH.png")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from astra.demo import MODELS
    MODELS[args.model].run(args.devices, plot_path=args.plot, json_path=args.json)
    return 0
