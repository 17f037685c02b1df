"""What Astra costs a causal LLM (``astra eval --model smollm2|PATH``, :mod:`astra.cli.eval`).

The evaluation text is cut into windows of ``tokens`` tokens (at most the model's
positions); on each window the unpatched model and the model patched for N simulated
devices (:func:`astra.patch`: one forward over the whole window emulates N devices,
each chunk seeing the earlier chunks through codes) are compared:

- ``ppl_single`` / ``ppl_astra``: ``exp`` of the mean next-token cross-entropy over all
  windows (every window weighs its ``tokens - 1`` predictions);
- ``top1_agreement``: over the positions of the *last* chunk (the tokens the last
  device holds, :func:`astra.layout.chunk_layout`), the fraction whose argmax of
  Astra's logits equals the single device's — the chunk that sees the most codes and
  the one generation continues from;
- ``greedy32_identical``: the fraction of prompts (each the first ``prompt_tokens``
  tokens of one of the first windows) whose first 32 greedy tokens
  (:func:`astra.generation.greedy`) are the single device's.

Codebooks are fitted by a :class:`~astra.calibrate.Method` on calibration windows (by
default the catalogue's, :func:`astra.catalog.llm.calibration_batches`) and cached by
:func:`astra.calibrate.calibrate`. The embedding models stay with :mod:`astra.evaluate`.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .calibrate import Method, calibrate
from .codebooks import Codebooks
from .layout import chunk_layout
from .options import GREEDY_TOKENS
from .options import LLM_CALIB_ITERS as CALIB_ITERS

__all__ = ["is_causal_lm", "check_options", "token_windows", "last_chunk", "patched",
           "window_stats", "greedy_identical", "compare_windows", "evaluate_llm",
           "GREEDY_TOKENS", "CALIB_ITERS"]

CALIB_TOKENS = 512     # calibration window (cut to the model's positions)
_LLAMA_FAMILY = "hf_llama"


# ------------------------------------------------------------------ which models, options

def is_causal_lm(model: str) -> bool:
    """Whether ``--model`` names a causal LLM evaluated here: ``smollm2``, a ``.gguf``
    file, a missing path (its loader names it), or a Hugging Face folder of a
    Llama-family model (other folders stay with :mod:`astra.evaluate`)."""
    from .catalog.llm import is_model_path
    from .models import TABLE
    if model == "smollm2":
        return True
    if not is_model_path(model):
        return False
    path = Path(model).expanduser()
    if not path.exists() or path.suffix.lower() == ".gguf":
        return True
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return TABLE.get(model_type) == _LLAMA_FAMILY


def _positive(name: str, value, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative" if zero_ok else "a positive"
        raise ValueError(f"{name} must be {what} integer, got {value!r}")


def check_options(devices: int, text=None, calib_text=None, tokens: int = 2048,
                  limit: Optional[int] = None, prompts: int = 4,
                  prompt_tokens: int = 512) -> None:
    """``ValueError`` (one line) for options no evaluation can run with; cheap, so it
    runs before any model is loaded."""
    _positive("--devices", devices)
    _positive("--tokens", tokens)
    _positive("--prompts", prompts, zero_ok=True)
    _positive("--prompt-tokens", prompt_tokens)
    if limit is not None:
        _positive("--limit", limit)
    for opt, path in (("--text", text), ("--calib-text", calib_text)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{opt} {path}: no such file")
    if tokens < max(devices, 2):
        raise ValueError(f"--tokens {tokens}: a window needs at least 2 tokens and one "
                         f"per device ({devices} devices)")
    if prompts and min(prompt_tokens, tokens) < devices:
        raise ValueError(f"--prompt-tokens {prompt_tokens}: a prompt needs at least one "
                         f"token per device ({devices} devices)")


# ------------------------------------------------------------------ windows

def token_windows(ids: Sequence[int], tokens: int, limit: Optional[int] = None) -> Tensor:
    """``ids`` cut into full non-overlapping windows of ``tokens``, ``[W, tokens]`` (at
    most ``limit`` of them; the remainder is dropped)."""
    n = len(ids) // tokens
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens for this model, "
                         f"fewer than one window of {tokens} (--tokens)")
    n = min(n, limit) if limit else n
    return torch.as_tensor(list(ids[: n * tokens]), dtype=torch.long).view(n, tokens)


def last_chunk(length: int, devices: int) -> Tensor:
    """Positions of a ``length``-token window that the last of ``devices`` holds."""
    return chunk_layout(length, devices).local_idx[-1]


def _text_ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _read_text(path) -> str:
    from . import data
    if path is None:
        return "\n\n".join(data.pydoc_topics("heldout").values())
    return Path(path).read_text(encoding="utf-8")


def _calibration(source, tokenizer, calib_text, calib_limit: Optional[int],
                 positions: Optional[int]) -> List[Tensor]:
    """Calibration batches (two windows each): the catalogue's unless ``calib_text``."""
    from .catalog.llm import CALIB_WINDOWS, calibration_batches
    windows = calib_limit or CALIB_WINDOWS
    if calib_text is None:
        return calibration_batches(source, windows=windows)
    tokens = min(CALIB_TOKENS, positions) if positions else CALIB_TOKENS
    ids = _text_ids(tokenizer, _read_text(calib_text))
    if len(ids) < tokens:
        raise ValueError(f"--calib-text {calib_text}: {len(ids)} tokens, fewer than one "
                         f"calibration window of {tokens}")
    return list(token_windows(ids, tokens, windows).split(2))


# ------------------------------------------------------------------ the measurements

@contextmanager
def patched(model: nn.Module, codebooks: Optional[Codebooks], devices: int) -> Iterator[nn.Module]:
    """``model`` patched for ``devices`` simulated devices inside the block, restored after."""
    from .patch import patch, unpatch
    patch(model, codebooks, devices=devices)
    try:
        yield model
    finally:
        unpatch(model)


@torch.no_grad()
def window_stats(model: nn.Module, windows: Tensor, positions: Tensor,
                 bar=None) -> Tuple[float, int, Tensor]:
    """``(summed next-token NLL, predictions, argmax [W, len(positions)])`` of ``model``
    over ``windows [W, T]``: the loss ``model(w, labels=w)`` averages, undone, and the
    top-1 token at ``positions`` of each window."""
    nll, count, top = 0.0, 0, []
    for w in windows:
        w = w.unsqueeze(0)
        logits = model(input_ids=w).logits.float()
        nll += float(torch.nn.functional.cross_entropy(
            logits[0, :-1], w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
        top.append(logits[0, positions].argmax(-1))
        if bar is not None:
            bar.update(1)
    return nll, count, torch.stack(top)


def greedy_identical(prompts: Sequence[Tensor], single_fn: Callable[[Tensor], Tensor],
                     astra_fn: Callable[[Tensor], Tensor]) -> Optional[float]:
    """The fraction of ``prompts`` (``[1, P]`` ids each) on which ``astra_fn`` continues
    exactly as ``single_fn`` (each ``ids -> generated tokens``). Every single-device
    continuation is made before the first Astra one; None without prompts."""
    if not prompts:
        return None
    ref = [single_fn(p) for p in prompts]
    same = [torch.equal(astra_fn(p), r) for p, r in zip(prompts, ref)]
    return sum(same) / len(same)


def compare_windows(model: nn.Module, windows: Tensor, codebooks: Optional[Codebooks],
                    devices: int, *, prompts: int = 0, prompt_tokens: int = 512,
                    new_tokens: int = GREEDY_TOKENS,
                    progress: bool = False) -> Dict[str, Optional[float]]:
    """The unpatched model against the model patched for ``devices`` with ``codebooks``
    (None: remote tokens at full precision) on ``windows [W, T]``: ``ppl_single``,
    ``ppl_astra``, ``top1_agreement`` (last chunk) and ``greedy{new_tokens}_identical``
    (the first ``prompts`` windows cut at ``prompt_tokens``; None when ``prompts=0``).
    The model comes back unpatched."""
    from tqdm.auto import tqdm

    from .generation import greedy
    pos = last_chunk(windows.shape[1], devices)
    with tqdm(total=2 * len(windows), desc="perplexity", disable=not progress,
              leave=False) as bar:
        nll_1, n, top_1 = window_stats(model, windows, pos, bar)
        with patched(model, codebooks, devices):
            nll_a, _, top_a = window_stats(model, windows, pos, bar)
    cut = windows[:prompts, :prompt_tokens]
    heads = [c.unsqueeze(0) for c in cut]

    def astra_fn(ids: Tensor) -> Tensor:
        with patched(model, codebooks, devices):
            return greedy(model, ids, new_tokens)
    same = greedy_identical(heads, lambda ids: greedy(model, ids, new_tokens), astra_fn)
    return {"ppl_single": math.exp(nll_1 / n), "ppl_astra": math.exp(nll_a / n),
            "top1_agreement": float((top_1 == top_a).double().mean()),
            f"greedy{new_tokens}_identical": same}


# ------------------------------------------------------------------ the whole evaluation

def _load(model_name: str):
    from .catalog import llm
    source = llm.model_source(model_name)
    model = llm.load_causal_lm(source)
    return source, model, llm.load_tokenizer(source)


def _hidden(model: nn.Module, batch: Tensor) -> Tensor:
    """What a distillation runs: the base model's last hidden state (the LM head is
    applied in the loss, to the positions it scores)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    return base(input_ids=batch).last_hidden_state


def distill_loss(model: nn.Module, batches: Sequence[Tensor], devices: int):
    """The codebook distillation loss of a causal LLM: KL of the next-token
    distributions (:func:`astra.calibrate.next_token_kl`) past the first device's chunk
    of the calibration windows (they are all one length)."""
    from .calibrate import next_token_kl
    skip = len(chunk_layout(batches[0].shape[-1], devices).local_idx[0])
    return next_token_kl(model.get_output_embeddings(), skip)


def evaluate_llm(model_name: str, method: Method, devices: int = 4, *, text=None,
                 tokens: int = 2048, limit: Optional[int] = None, prompts: int = 4,
                 prompt_tokens: int = 512, calib_text=None,
                 calib_limit: Optional[int] = None, cache: bool = True,
                 progress: bool = True,
                 log: Callable[[str], None] = print) -> Dict[str, object]:
    """Calibrate (or load cached) codebooks for ``model_name`` (``smollm2``, an HF
    folder or a ``.gguf`` file) by ``method`` and compare N devices with one on
    ``text`` (default: the held-out pydoc topics) in windows of ``tokens`` (at most the
    model's positions; ``limit`` windows at most). Returns the JSON row (see the
    module docstring for the metrics)."""
    check_options(devices, text, calib_text, tokens, limit, prompts, prompt_tokens)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    source, model, tok = _load(model_name)
    positions = getattr(model.config, "max_position_embeddings", None)
    T = min(tokens, positions) if positions else tokens
    windows = token_windows(_text_ids(tok, _read_text(text)), T, limit)
    prompt_len = min(prompt_tokens, T, (positions or T + GREEDY_TOKENS) - GREEDY_TOKENS)
    prompts = min(prompts, len(windows))
    if prompts and prompt_len < devices:
        raise ValueError(f"prompts of {prompt_len} tokens (this model has {positions} "
                         f"positions) are shorter than {devices} devices")
    log(f"{model_name}: {method.describe()}, N={devices}, {len(windows)} windows of {T} "
        f"tokens, {prompts} prompts of {prompt_len}")
    t0 = time.perf_counter()
    batches = _calibration(source, tok, calib_text, calib_limit, positions)
    cb = calibrate(model, batches, method, devices=devices, forward=_hidden, cache=cache,
                   loss=distill_loss(model, batches, devices), loss_name="kl",
                   progress=progress, log=log)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compare_windows(model, windows, cb, devices, prompts=prompts,
                          prompt_tokens=prompt_len, progress=progress)
    t_eval = time.perf_counter() - t0
    bits = [cb.layer_bits(i) for i in range(cb.num_layers)]
    row: Dict[str, object] = {
        "model": model_name, "devices": devices, "groups": method.groups,
        "codebook_size": method.codebook_size, "method": method.name,
        "stages": list(method.stage_sizes or ()), "quantize": method.target,
        "bits_per_token": cb.bits_per_token,  # per layer: the name for it
        "bits_per_token_per_layer": cb.bits_per_token, "tokens": T,
        "windows": len(windows), "prompts": prompts, "prompt_tokens": prompt_len, **res,
        "calibrate_s": round(t_cal, 1), "eval_s": round(t_eval, 1),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "text": str(text) if text is not None else "pydoc heldout"}
    if len(set(bits)) > 1:
        row["layer_bits"] = bits
    return row
