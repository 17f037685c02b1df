"""Argument types shared by the commands: each turns a bad value into argparse's own
one-line usage error (exit 2) before any work starts.

Also the residual-stage options of ``astra eval`` and ``astra finetune``
(:func:`add_residual_options`); ``--layer-residual`` is parsed by
:func:`layer_stages_arg` in the command's ``main`` (``ValueError``: one line, exit 2)."""
from __future__ import annotations

import argparse
import math
from typing import List, Sequence, Tuple


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _number(text: str, ok, what: str) -> float:
    """``float(text)`` when ``ok`` of it, else argparse's error naming ``what``."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_float(text: str) -> float:
    return _number(text, lambda v: math.isfinite(v) and v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")


def add_timeout(p: argparse.ArgumentParser, default: float) -> None:
    """``--timeout S``: how long a rank waits for a peer before the run stops."""
    p.add_argument("--timeout", type=positive_float, default=default, metavar="S",
                   help="seconds a device waits for another before the run stops and names "
                   f"the device that stopped answering (default {default:g})")


def probability(text: str) -> float:
    return _number(text, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")


def csv_ints(text: str) -> List[int]:
    """``"3,5,8"`` -> ``[3, 5, 8]`` (positive integers)."""
    return [positive_int(t.strip()) for t in text.split(",")]


def csv_floats(text: str) -> List[float]:
    """``"10,100"`` -> ``[10.0, 100.0]`` (positive numbers)."""
    return [positive_float(t.strip()) for t in text.split(",")]


def pairs_of(first, second, what: str = "A:B"):
    """An argument type: comma-separated ``a:b`` pairs, each side parsed by ``first`` /
    ``second`` (``what`` names the form in the error)."""
    def parse(text: str) -> List[Tuple]:
        out = []
        for item in text.split(","):
            a, sep, b = item.strip().partition(":")
            try:
                pair = (first(a), second(b)) if sep else None
            except (ValueError, argparse.ArgumentTypeError):
                pair = None
            if pair is None:
                raise argparse.ArgumentTypeError(f"expected {what} pairs, got {item!r}")
            out.append(pair)
        return out
    parse.__name__ = "pairs"
    return parse


def time_rates(text: str) -> List[Tuple[float, float]]:
    """``"2:1,5:10"`` -> ``[(2.0, 1.0), (5.0, 10.0)]``: (seconds >= 0, Mbit/s > 0) pairs in
    time order (a bandwidth trace)."""
    out = pairs_of(nonnegative_float, positive_float, "SECONDS:MBITS")(text)
    if [t for t, _ in out] != sorted(t for t, _ in out):
        raise argparse.ArgumentTypeError(f"the times of {text!r} must not decrease")
    return out


def csv_choices(*choices: str):
    """A comma-separated subset of ``choices``."""
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or repr(text)}: expected a comma-separated subset of "
                f"{', '.join(choices)}")
        return items
    parse.__name__ = "list"
    return parse


# ------------------------------------------------------------- residual codebook stages

LayerStages = Tuple[Tuple[int, Tuple[int, ...]], ...]


def sizes(text: str) -> Tuple[int, ...]:
    """``"16"``, ``"4096,16"``, ``"256x9"`` (nine stages of 256) -> a tuple of sizes."""
    out = []
    for part in (text or "").split(","):
        if part.strip():
            k, _, n = part.strip().partition("x")
            out += [int(k)] * (int(n) if n else 1)
    return tuple(out)


def layer_stages(spec: str) -> Tuple[int, Tuple[int, ...]]:
    """One ``--layer-residual``: ``"-1:4096,4096"`` -> ``(-1, (4096, 4096))``."""
    layer, sep, rest = spec.partition(":")
    try:
        parsed = (int(layer), sizes(rest))
    except ValueError as e:
        raise ValueError(f"--layer-residual {spec!r}: expected LAYER:K2[,K3..] ({e})") from None
    if not sep:
        raise ValueError(f"--layer-residual {spec!r}: expected LAYER:K2[,K3..]")
    return parsed


def layer_stages_arg(specs: Sequence[str]) -> LayerStages:
    """Every ``--layer-residual``: ``["-1:4096,4096", ...]`` -> ``((-1, (4096, 4096)), ...)``;
    ``"0-9:1"`` stands for layers 0 to 9 (inclusive) alike."""
    out = []
    for spec in specs:
        layer, sep, rest = spec.partition(":")
        lo, dash, hi = layer.partition("-")
        if dash and lo.isdigit() and hi.isdigit():
            if int(hi) < int(lo):
                raise ValueError(f"--layer-residual {spec!r}: the range {layer} is empty")
            out += [layer_stages(f"{i}{sep}{rest}") for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(layer_stages(spec))
    return tuple(out)


def add_residual_options(p: argparse.ArgumentParser, residual_help: str,
                         layer_example: str) -> None:
    """``--residual K2[,K3..]`` and ``--layer-residual L:K2[,K3..]`` (repeatable)."""
    p.add_argument("--residual", type=sizes, default=(), metavar="K2[,K3..]",
                   help=residual_help)
    p.add_argument("--layer-residual", action="append", default=[], metavar="L:K2[,K3..]",
                   help="layer L (negative: from the end; A-B: layers A to B) gets these "
                   "residual stages instead of --residual's (a stage of 1: no bits); "
                   f"repeatable (e.g. {layer_example})")
