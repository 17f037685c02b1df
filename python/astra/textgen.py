"""Text generation across devices (``astra generate``): a prompt in, streamed text out.

The prompt is tokenized by the model's own tokenizer (``chat``: its chat template, the
prompt as the user's turn); N local ranks prefill it over the emulated link and the
rank holding the last chunk generates alone (:mod:`astra.parallel.generate`). The
caller sees the text as it comes (``on_text``) and gets a summary: TTFT, decode
tokens/s, bytes each device sent, and the remote part of the decoder's KV cache beside
what fp16 keys/values of the same tokens would take.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from .options import DECODE_WEIGHTS, GENERATE_WEIGHTS
from .options import GENERATE_STRATEGIES as STRATEGIES

__all__ = ["prompt_ids", "generate", "STRATEGIES", "TextStream"]


def prompt_ids(model: str, prompt: str, chat: bool = False) -> torch.Tensor:
    """``[1, T]`` token ids of ``prompt`` for ``model`` (a catalogue name or a path);
    ``chat``: wrapped in the model's chat template as the user's turn."""
    from astra.catalog import llm
    src = llm.model_source(model)
    if not llm.is_model_path(src):
        raise ValueError(f"--model {model}: generation needs a causal LM (smollm2, a local "
                         "HF folder or a .gguf file)")
    tok = llm.load_tokenizer(src)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"--chat: {model}'s tokenizer has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_dict=False)
    else:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    if len(ids) < 2:
        raise ValueError("the prompt must be at least 2 tokens long")
    return torch.tensor([ids])


class TextStream:
    """Turns streamed ids into text: decodes all ids so far, hands on what is new
    (a partial UTF-8 character waits for its next token)."""

    def __init__(self, tok, fn: Callable[[str], None]):
        self.tok, self.fn, self.ids, self.done = tok, fn, [], ""

    def __call__(self, ids: List[int]) -> None:
        if not ids:  # one pass ended: the next repeat starts over
            self.ids, self.done = [], ""
            return
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.fn(text[len(self.done):])
        self.done = text


def generate(model: str, ids: torch.Tensor, *, devices: int = 4, strategy: str = "astra",
             max_new_tokens: int = 64, bandwidth_mbps: float = 10.0, latency_ms: float = 0.5,
             clock: str = "virtual", chunks: Optional[List[int]] = None,
             generation: Optional[Dict[str, Any]] = None, repeats: int = 1,
             on_text: Optional[Callable[[str], None]] = None, prepared=None,
             threads: int = 1, timeout_s: float = 600.0,
             decode_weights: str = GENERATE_WEIGHTS) -> Dict[str, Any]:
    """Prefill ``ids [1, T]`` on ``devices`` ranks by ``strategy`` (``single``: one rank;
    ``auto``: the planner's choice of devices and chunks, or one device, for the prefill;
    the row then carries ``"plan"``) and generate ``max_new_tokens`` on the last; the
    summary row (see the module docstring). ``prepared``: a
    :class:`astra.catalog.Prepared` to reuse; ``timeout_s``: how long a rank waits for a
    peer (the run then stops naming the silent rank); ``decode_weights``: ``int8`` or
    ``fp32`` (the weights a decode step reads, :mod:`astra.decode`; ``fp32`` gives HF's
    own logits)."""
    from astra import catalog
    from astra.catalog import llm
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, check_chunks, launch
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if decode_weights not in DECODE_WEIGHTS:
        raise ValueError(f"decode weights must be one of {', '.join(DECODE_WEIGHTS)}, "
                         f"got {decode_weights!r}")
    if strategy == "auto" and chunks is not None:
        raise ValueError("--chunks fixes the split: give it with --strategy astra (auto "
                         "chooses the devices and chunks itself)")
    world = 1 if strategy == "single" else devices
    T = int(ids.shape[1])
    if T - 1 < world:
        raise ValueError(f"a {T}-token prompt cannot be split over {world} devices")
    check_chunks(chunks, T - 1, world)  # the ranks prefill all but the last token
    entry = catalog.get(model)
    if entry.max_tokens and T + max_new_tokens > entry.max_tokens:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed the model's "
                         f"{entry.max_tokens} positions")
    prep = prepared or catalog.prepare(model, min(T, entry.max_tokens or T),
                                       with_codebooks=strategy in ("astra", "auto"))
    plan = None
    if strategy == "auto":
        from astra.parallel import planner, probe
        # the ranks prefill all but the last prompt token
        cost = probe.compute_cost(prep.spec, ids[:, :-1], prep.codebooks, progress=True)
        plan = planner.plan(cost, [1.0] * devices, LinkModel(bandwidth_mbps, latency_ms))
        strategy, chunks, world = plan.strategy, plan.chunks, len(plan.devices)
    job = Job(strategy, ids, codebooks=prep.codebooks if strategy == "astra" else None,
              chunks=chunks, output="compact", link=LinkModel(bandwidth_mbps, latency_ms),
              clock=clock, repeats=repeats, warmup=0, timeout_s=timeout_s,
              max_new_tokens=max_new_tokens, generation=generation or dict(do_sample=False),
              decode_weights=decode_weights)
    tok = llm.load_tokenizer(llm.model_source(model))
    stream = TextStream(tok, on_text) if on_text else None
    res = launch(prep.spec, [job], world, stream=stream, threads=threads)[0]
    gen = [r["generation"] for r in res if r.get("generation")]
    if not gen:
        raise RuntimeError("the decoding rank returned no generation")
    g = gen[-1]
    sent = [max(r["bytes_sent"]) if r["bytes_sent"] else 0 for r in res]
    text = tok.decode(g["tokens"].tolist(), skip_special_tokens=True)
    return dict(text=text, ttft_ms=g["ttft_s"] * 1e3, prefill_ms=g["prefill_s"] * 1e3,
                decode_tok_s=g["decode_tok_s"], new_tokens=g["new_tokens"],
                tokens=g["tokens"].tolist(), prompt_tokens=T,
                bytes_per_device=max(sent) if strategy != "single" else 0,
                remote_kv_bytes=g["remote_kv_bytes"],
                remote_kv_fp16_bytes=g["remote_kv_fp16_bytes"],
                remote_tokens=g["remote_tokens"], devices=world, strategy=strategy,
                chunks=res[0]["chunks"], bandwidth_mbps=bandwidth_mbps, latency_ms=latency_ms,
                clock=clock, threads=threads, decode_weights=decode_weights,
                plan=None if plan is None else plan.as_dict())
