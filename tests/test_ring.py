"""The ``ring`` strategy (exact sequence-parallel prefill, K/V on the wire) and the
causal-balanced default chunks.

Ring runs in real worker processes (gloo) on tiny random Llama / Qwen3 models, with
uneven chunks, against the ``single`` strategy of the same launch; its bytes against
the K/V sizes. One launch per case, shared by the tests through a fixture. More models
and splits (GPT-2: no RoPE) run in one process, ranks as threads.
"""
import types

import pytest
import torch

from astra.catalog import factories
from astra.models import resolve
from astra.parallel import wire
from astra.parallel.job import attn_per_key, chunk_cost, default_chunks
from astra.parallel.ring import check_ring, setup_ring
from astra.parallel.runner import Job, ModelSpec, launch
from astra.parallel.worker import STRATEGIES
from tests.test_llama import _Hub, _threads, chunk_forward

B = 2
CASES = {  # name: (factory, world, tokens, uneven chunks)
    "llama-N2": (factories.tiny_llama, 2, 19, [5, 14]),
    "llama-N3": (factories.tiny_llama, 3, 18, [9, 2, 7]),
    "qwen3-N2": (factories.tiny_qwen3, 2, 17, [12, 5]),
    "qwen3-N3": (factories.tiny_qwen3, 3, 16, [3, 8, 5]),
}
WIRE_TOL = {"fp16": 2e-2, "int8": 0.1}  # max error relative to the largest logit


def _ids(T, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    factory, world, T, chunks = CASES[request.param]
    spec = ModelSpec(factory)
    model = spec.build()
    x = _ids(T)
    jobs = [Job("single", x, name="single"),
            Job("ring", x, chunks=chunks, name="fp32"),
            Job("ring", x, chunks=chunks, wire="fp16", name="fp16"),
            Job("ring", x, chunks=chunks, wire="int8", name="int8"),
            Job("ring", x, output="compact", name="compact")]  # default (causal) chunks
    res = launch(spec, jobs, world)
    return dict(model=model, world=world, T=T, chunks=chunks,
                res={j.name: r for j, r in zip(jobs, res)})


def test_ring_fp32_equals_single(case):
    ref = case["res"]["single"][0]["output"]
    torch.testing.assert_close(case["res"]["fp32"][0]["output"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case["res"]["compact"][0]["output"], ref[:, -1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wire_", ["fp16", "int8"])
def test_compressed_kv_is_close(case, wire_):
    ref = case["res"]["single"][0]["output"]
    err = (case["res"][wire_][0]["output"] - ref).abs().max().item()
    assert 0 < err < WIRE_TOL[wire_] * ref.abs().max().item()


def _kv_width(model):
    """``Hkv·d``: the K (or V) elements of one token."""
    cfg = model.config
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    return Hkv * (getattr(cfg, "head_dim", None) or cfg.hidden_size // H)


def _kv_frame(kind, model, tokens):
    return wire.frame_nbytes(kind, 2 * B, tokens, _kv_width(model))


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_bytes_are_the_kv_of_the_chunk_to_later_ranks(case, kind):
    world, chunks, model = case["world"], case["chunks"], case["model"]
    for r, res in enumerate(case["res"][kind]):
        assert res["chunks"] == chunks
        frame = _kv_frame(kind, model, chunks[r])
        ex = [c for c in res["collectives"] if c["what"].startswith("exchange")]
        assert len(ex) == 2  # one per layer
        for c in ex:
            assert c["sent"] == (world - 1 - r) * frame
            assert c["recv"] == sum(_kv_frame(kind, model, chunks[s]) for s in range(r))
        # output="full": then every rank but 0 sends its hidden states [B, T_r, D] (fp32)
        gather = 0 if r == 0 else wire.frame_nbytes("fp32", B, chunks[r],
                                                    model.config.hidden_size)
        assert res["bytes_sent"] == [2 * (world - 1 - r) * frame + gather]
    per_token = {"fp32": 4 * 2 * _kv_width(model), "fp16": 2 * 2 * _kv_width(model),
                 "int8": 2 * (_kv_width(model) + 4)}[kind]  # int8: a scale for K, one for V
    assert _kv_frame(kind, model, 5) == wire.HEADER_BYTES + B * 5 * per_token


def test_default_chunks_are_the_causal_ones_and_recorded(case):
    model, world, T = case["model"], case["world"], case["T"]
    want = default_chunks(T, world, attn_per_key(model, resolve(model)[1]))
    assert all(res["chunks"] == want for res in case["res"]["compact"])


@pytest.mark.parametrize("factory,chunks", [
    (factories.tiny_gpt2, [4, 6, 5]), (factories.tiny_gpt2, [1, 1, 13]),
    (factories.tiny_llama, [6, 1, 3, 5]), (factories.tiny_qwen2, [9, 6])],
    ids=["gpt2-N3", "gpt2-N3-first-short", "llama-N4", "qwen2-N2"])
def test_ring_in_one_process_equals_the_model(factory, chunks):
    """Ranks as threads over an all-gather hub (the communicator's exchange_start)."""
    x = _ids(sum(chunks))
    base = factory()
    ad = resolve(base)[1]
    with torch.no_grad():
        ref = base(x, use_cache=False).logits
    hub, models = _Hub(chunks, overlap=True), [factory() for _ in chunks]

    def rank(r):
        m = models[r]
        run = types.SimpleNamespace(model=m, adapter=ad, comm=hub.comm(r))
        assert STRATEGIES["ring"].setup(run, None)
        return chunk_forward(ad, m, x, chunks, r)
    out = torch.cat(_threads(rank, len(chunks)), dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_model_is_refused_clearly():
    import astra
    model = factories.tiny_bert()
    with pytest.raises(ValueError, match="runs causal language models only.*bert"):
        check_ring(model, resolve(model)[1])
    # the worker's set-up refuses it before patching anything
    assert STRATEGIES["ring"].setup is setup_ring
    run = types.SimpleNamespace(model=model, adapter=resolve(model)[1], comm=None)
    with pytest.raises(ValueError, match="^strategy 'ring' runs causal language models only"):
        setup_ring(run)
    assert not astra.is_patched(model)


# ------------------------------------------------------------------- causal chunks

@pytest.mark.parametrize("n", [1, 2, 5, 12, 16, 18, 33, 97, 500])
def test_causal_chunks_are_balanced_by_cost(n):
    for N in (1, 2, 3, 4, 6, 8):
        for w in (0.0, 1e-4, 0.01, 0.05, 0.3, 3.0, 100.0):
            if N > n:
                continue
            c = default_chunks(n, N, w)
            what = f"default_chunks({n}, {N}, {w}) = {c}"
            assert len(c) == N and sum(c) == n and min(c) >= 1, what
            assert all(a >= b for a, b in zip(c, c[1:])), what  # earlier ranks: more tokens
            bounds = [sum(c[:i]) for i in range(N + 1)]
            costs = [chunk_cost(bounds[i], bounds[i + 1], w) for i in range(N)]
            last = chunk_cost(n - 1, n, w)  # the costliest token
            assert max(costs) - min(costs) <= last * (1 + 1e-9), (what, costs)


def test_zero_weight_and_one_rank_give_the_equal_chunks():
    for n, N in [(10, 4), (23, 3), (7, 7), (100, 1)]:
        assert default_chunks(n, N, 0.0) == default_chunks(n, N) == \
            [int(t.numel()) for t in torch.tensor_split(torch.arange(n), N)]
    assert default_chunks(1000, 1, 5.0) == [1000]
    assert default_chunks(1000, 4, 0.1) == sorted(default_chunks(1000, 4, 0.1), reverse=True)
    c = default_chunks(1000, 4, 0.1)
    assert c[0] > 1.5 * c[-1]  # attention-dominated: the first rank takes far more


def test_attn_per_key_from_the_model_dims():
    # attention FLOPs per key 4·H·d over a token's linear FLOPs 2·(weights of a block)
    def linear(D, H, Hkv, d, F, gated):
        return 2 * (D * H * d + 2 * D * Hkv * d + H * d * D + (3 if gated else 2) * D * F)
    for factory, dims in [(factories.tiny_llama, (64, 4, 2, 16, 128, True)),
                          (factories.tiny_qwen3, (64, 4, 2, 16, 128, True)),
                          (factories.tiny_gpt2, (32, 4, 4, 8, 128, False))]:
        model = factory()
        D, H, Hkv, d, F, gated = dims
        got = attn_per_key(model, resolve(model)[1])
        assert got == pytest.approx(4 * H * d / linear(*dims))
    bert = factories.tiny_bert()
    assert attn_per_key(bert, resolve(bert)[1]) == 0.0
