"""Argument parsers of ``astra run`` and ``astra bench e2e`` (cheap to import: the
runner, models and torch load only when the command runs)."""
from __future__ import annotations


def add_parser(sub) -> None:
    """``astra run``: one model, one strategy, N local ranks on an emulated link."""
    p = sub.add_parser("run", help="run a model across N local processes on an emulated link")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--model", default="gpt2",
                   help="vit-base | gpt2 | minilm | byte-gpt2 | digits-vit | link-probe | "
                   "tiny-gpt2 | tiny-bert | tiny-hf-vit")
    p.add_argument("--strategy", default="astra", choices=("single", "sp", "tp", "astra"))
    p.add_argument("--wire", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--tokens", type=int, default=256, help="sequence length (text models)")
    p.add_argument("--chunks", help="comma-separated content tokens per rank (uneven devices)")
    p.add_argument("--bandwidth", type=float, default=10.0, help="Mbit/s")
    p.add_argument("--latency-ms", type=float, default=0.5, help="one-way latency per transfer")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability (codes)")
    p.add_argument("--medium", choices=("shared", "switched"), default="shared")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where each rank computes (cuda: rank r on GPU r %% count; the "
                   "bytes still travel over gloo)")
    add_codebook_args(p)
    p.set_defaults(func=_cmd_run)


def add_codebook_args(p) -> None:
    """``--codebooks PATH`` | ``--checkpoint DIR`` (``astra run`` and the torchrun entry)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--codebooks", metavar="PATH",
                   help="a saved Codebooks file (grouped or residual), checked against the "
                   "model (default: codebooks fitted quickly on the model's activations); "
                   "across hosts every host needs the same file")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="an `astra finetune` checkpoint folder: its weights and codebooks")


def _cmd_run(args) -> int:
    from .runner import _cmd_run as run
    return run(args)


def add_bench_parser(bsub) -> None:
    """``astra bench e2e``."""
    e = bsub.add_parser("e2e", help="end-to-end latency of single/tp/sp/astra over a link")
    e.add_argument("--model", default="vit-base", help="vit-base | gpt2 | minilm")
    e.add_argument("--devices", type=int, default=4)
    e.add_argument("--bandwidth", default="10", help="Mbit/s, comma-separated")
    e.add_argument("--latency-ms", type=float, default=0.5, help="one-way latency per transfer")
    e.add_argument("--strategies", default="single,tp,sp,astra")
    e.add_argument("--wire", default="fp32", help="fp32,fp16,int8 (comma-separated)")
    e.add_argument("--link", choices=("emulated", "netns", "virtual"), default="emulated")
    e.add_argument("--tokens", type=int, default=256, help="sequence length (text models)")
    e.add_argument("--medium", choices=("shared", "switched"), default="shared",
                   help="shared: one channel for all transfers (Wi-Fi); switched: per-port links")
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--warmup", type=int, default=1)
    e.add_argument("--json", metavar="PATH")
    e.add_argument("--plot", metavar="PATH.png")
    e.set_defaults(func=_cmd_e2e)


def _cmd_e2e(args) -> int:
    from astra.bench.e2e import cmd_e2e
    return cmd_e2e(args)
