"""Plots of training runs (matplotlib, imported when a plot is drawn)."""
from __future__ import annotations

import os
from typing import Dict, List, Union

__all__ = ["plot_history"]


def plot_history(history: List[Dict[str, float]], path: Union[str, os.PathLike]) -> None:
    """The loss curves (total, task, distillation, auxiliary) per step, log y axis: each
    step faint, its exponential moving average (0.9) solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "task", "distill", "aux"):
        ys = [max(h[key], 1e-12) for h in history]
        if any(y > 1e-12 for y in ys):
            smooth, acc = [], ys[0]
            for y in ys:  # exponential moving average: one batch per step is noisy
                acc = 0.9 * acc + 0.1 * y
                smooth.append(acc)
            line, = ax.plot(steps, smooth, label=key)
            ax.plot(steps, ys, color=line.get_color(), alpha=0.2, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("astra finetune")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
