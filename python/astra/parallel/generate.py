"""Generation jobs (``Job.max_new_tokens > 0``): a distributed prefill, then one rank decodes.

The ranks prefill the prompt but its last token (chunks over ``T - 1`` tokens); the
rank holding the last chunk keeps its :class:`~astra.generation.AstraCache` (its own
keys/values exact, every earlier token as codes) and runs HF ``generate`` from there:
the prompt's last token is the first one it feeds, so greedy decoding, sampling, EOS and
the logits processors apply from the first generated token on, as on one device.
Nothing crosses the link while it decodes. ``single``: rank 0 alone, the model patched
for one device (the fused kernels; HF's own cache), the same two phases.

Timing: the prefill on the job's clock (the last rank's: its chunk is the last to
finish), the decode on the wall clock of the decoding rank (no link is involved).
TTFT = prefill + the first generated token. Generated ids are appended to the file
named by ``ASTRA_STREAM`` (set by the launcher) as they come, for the caller to print.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch

__all__ = ["decoder_rank", "generate_forward", "kv_fp16_bytes"]


def decoder_rank(strategy: str, world: int) -> int:
    """The rank that decodes: the last (it holds the last chunk), rank 0 for ``single``."""
    return 0 if strategy == "single" else world - 1


class _Streamer:
    """HF streamer: the time of the first generated token, and every generated id
    appended to ``path`` (one per line, flushed) when given."""

    def __init__(self, path: Optional[str]):
        self.f = open(path, "a") if path else None
        self.first_s: Optional[float] = None
        self.n = 0
        self._prompt = True

    def put(self, value):
        if self._prompt:  # generate() first hands over the prompt
            self._prompt = False
            return
        if self.first_s is None:
            self.first_s = time.perf_counter()
        ids = value.reshape(-1).tolist()
        self.n += len(ids)
        if self.f is not None:
            self.f.write("".join(f"{i}\n" for i in ids))
            self.f.flush()

    def end(self):
        if self.f is not None:
            self.f.write("end\n")
            self.f.close()
            self.f = None


def kv_fp16_bytes(model, adapter, tokens: int) -> int:
    """What ``tokens`` tokens' keys and values take in fp16 over every layer."""
    a = adapter.layers(model)[0].self_attn
    cfg = adapter.config(model)
    return tokens * len(adapter.layers(model)) * 2 * cfg.num_key_value_heads * a.head_dim * 2


def _prefill(r, cache) -> None:
    """This rank's chunk of the prompt through every block (the patched attention
    exchanges codes and, given ``cache``, keeps what decoding needs)."""
    from astra.generation import cache_kw
    kw = {cache_kw(r.model): cache} if cache is not None else {}
    h = r.embed(r.lo, r.hi)
    for b in r.adapter.layers(r.model):
        h = b(h, **kw)
        h = h[0] if isinstance(h, tuple) else h


def generate_forward(r, job) -> Optional[Dict[str, Any]]:
    """One timed pass of a generation job on this rank; the decoding rank returns
    ``tokens``, ``prefill_s``, ``ttft_s``, ``decode_s``, ``decode_tok_s`` and the KV
    cache's sizes, every other rank None."""
    from astra.generation import AstraCache, cache_kw
    me = decoder_rank(job.strategy, r.world)
    prompt = job.inputs
    clock = r.comm.clock
    t0 = clock.now()
    if job.strategy == "single":
        if r.rank != 0:
            return None
        cache = AstraCache()  # N = 1: every token exact, the decoder's buffers
        # the prompt's logits are not needed (logits_to_keep=1: no 49k-wide LM head over
        # every position, as the distributed ranks skip it too)
        r.model(prompt[:, :-1], use_cache=True, logits_to_keep=1, **{cache_kw(r.model): cache})
    else:
        cache = AstraCache() if r.rank == me else None
        _prefill(r, cache)
        if r.rank != me:
            return None
    prefill_s = clock.now() - t0
    streamer = _Streamer(os.environ.get("ASTRA_STREAM"))
    gen = dict(job.generation or {})
    seed = gen.pop("seed", None)
    if seed is not None:
        torch.manual_seed(int(seed))
    t1 = time.perf_counter()
    out = r.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=job.max_new_tokens, streamer=streamer,
                           pad_token_id=0, **{cache_kw(r.model): cache}, **gen)
    t2 = time.perf_counter()
    streamer.end()
    tokens = out[0, prompt.shape[1]:].cpu()
    n = int(tokens.numel())
    first = (streamer.first_s or t2) - t1
    remote = cache.remote_tokens() if isinstance(cache, AstraCache) else 0
    return dict(tokens=tokens, prefill_s=prefill_s, ttft_s=prefill_s + first,
                decode_s=t2 - t1, new_tokens=n,
                decode_tok_s=(n - 1) / (t2 - t1 - first) if n > 1 and t2 - t1 > first else 0.0,
                remote_tokens=remote,
                remote_kv_bytes=cache.remote_bytes() if isinstance(cache, AstraCache) else 0,
                remote_kv_fp16_bytes=kv_fp16_bytes(r.model, r.adapter, remote))
