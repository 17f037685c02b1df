"""Generation over the compressed remote KV cache (:mod:`astra.generation`), in one
process and through the runner (:mod:`astra.parallel.generate`), against HF ``generate``
and the single-process simulation."""

import json
import math

import pytest
import torch

import astra
from astra import catalog
from astra.catalog import ModelSpec, factories
from astra.generation import AstraCache, cache_kw, greedy
from astra.parallel.runner import Job, launch

FACTORIES = {"llama": factories.tiny_llama, "qwen2": factories.tiny_qwen2,
             "qwen3": factories.tiny_qwen3}


def _ids(T, seed=0):
    return torch.randint(1, 101, (1, T), generator=torch.Generator().manual_seed(seed))


def _codebooks(model, G=2, K=16):
    return astra.Codebooks(catalog.quick_codebooks(model, _ids(40, seed=1).repeat(2, 1), G=G, K=K))


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    return request.param, FACTORIES[request.param]()


def _patched_greedy(model, x, n, *args, **kw):
    astra.patch(model, *args, **kw)
    try:
        return greedy(model, x, n)
    finally:
        astra.unpatch(model)


@pytest.mark.parametrize("devices", [1, 3])
def test_exact_remote_context_generates_hf_greedy(family, devices):
    """No codebook: a remote token is seen exactly, so N devices decode HF's tokens."""
    _, model = family
    x = _ids(23)
    ref = greedy(model, x, 8)
    assert torch.equal(_patched_greedy(model, x, 8, None, devices=devices), ref)


def decode_and_full(model, x):
    """A patched ``model``: the prefill of ``x`` into an :class:`AstraCache`, one decode
    step of its greedy next token, and a forward over ``x`` and that token without a
    cache; ``(step logits, full logits, the token, the cache)``."""
    with torch.no_grad():
        cache = AstraCache()
        out = model(x, use_cache=True, **{cache_kw(model): cache})
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(nxt, use_cache=True, **{cache_kw(model): cache}).logits[:, -1]
        full = model(torch.cat([x, nxt], 1), use_cache=False).logits[:, -1]
    return step, full, nxt, cache


@pytest.mark.parametrize("G", [1, 2])
def test_decode_step_equals_the_simulation_one_token_longer(family, G):
    """A decoded token's logits equal a simulated forward over T + 1 tokens in which it
    is the last chunk's (T = 3·8 - 1: the chunks of T and T + 1 differ in the last)."""
    _, model = family
    x = _ids(23)
    astra.patch(model, _codebooks(model, G=G), devices=3)
    try:
        step, full, nxt, cache = decode_and_full(model, x)
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    finally:
        astra.unpatch(model)
    with torch.no_grad():
        exact_next = model(torch.cat([x, nxt], 1)).logits[:, -1]
    assert (exact_next - step).abs().max() > 1e-3  # the codes change the answer
    assert cache.local_tokens() == 7 + 1 and cache.remote_tokens() == 16  # chunks 8, 8, 7


def test_remote_tokens_cost_their_packed_codes():
    model = factories.tiny_llama()
    K, G = 16, 2
    astra.patch(model, _codebooks(model, G=G, K=K), devices=4)
    try:
        with torch.no_grad():
            cache = AstraCache()
            model(_ids(40), use_cache=True, **{cache_kw(model): cache})
    finally:
        astra.unpatch(model)
    Tr = 30  # the first three chunks of 10
    per_layer = math.ceil(Tr * G * math.log2(K) / 8)
    assert cache.remote_tokens() == Tr
    assert cache.remote_bytes() == per_layer * len(model.model.layers)
    for layer in cache.layers:
        assert layer.codes is not None and layer.remote_kv is None


def test_residual_stages_pack_as_one_mixed_radix_code():
    """Stages of 16 and 4 words: one 6-bit number per token (16 x 4 = 64), not 4 + 4
    bits; unpacking gives the columns back."""
    from astra.generation import PackedCodes
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, 16, (2, 37), generator=g),
                         torch.randint(0, 4, (2, 37), generator=g)], -1)
    p = PackedCodes.pack(codes, [16, 4])
    assert p.bits == 6 and p.nbytes == math.ceil(2 * 37 * 6 / 8)
    assert torch.equal(p.unpack(), codes.int())
    even = PackedCodes.pack(codes, 16)  # one size for all columns: 2 x 4 bits as before
    assert even.bits == 8 and torch.equal(even.unpack(), codes.int())
    lost = codes.clone()
    lost[0, 3, 1] = -1  # a missing code: kept as int32, unpacked as it is
    assert PackedCodes.pack(lost, [16, 4]).bits == 0


def test_hf_cache_cannot_decode_for_several_devices():
    from transformers.cache_utils import DynamicCache
    model = factories.tiny_llama()
    astra.patch(model, _codebooks(model), devices=2)
    try:
        with torch.no_grad():
            cache = DynamicCache()
            model(_ids(12), use_cache=True, **{cache_kw(model): cache})
            with pytest.raises(ValueError, match="AstraCache"):
                model(_ids(1), use_cache=True, **{cache_kw(model): cache})
    finally:
        astra.unpatch(model)


# -------------------------------------------------------------------------- runner

@pytest.fixture(scope="module")
def runs():
    """Generation jobs on 3 ranks (the prompt's 24 tokens: 23 prefilled in chunks of
    8, 8, 7, as the simulation splits them), beside the simulation and HF."""
    spec = ModelSpec(factories.tiny_llama)
    model = spec.build()
    x = _ids(24)
    n = 6
    cb = _codebooks(model)
    ref = greedy(model, x, n)
    astra.patch(model, cb, devices=3)
    try:  # the simulation of what the last rank does: prefill T-1, then generate
        with torch.no_grad():
            cache = AstraCache()
            model(x[:, :-1], use_cache=True, **{cache_kw(model): cache})
            sim = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0,
                                 **{cache_kw(model): cache})[0, x.shape[1]:]
    finally:
        astra.unpatch(model)
    gen = dict(do_sample=False, min_new_tokens=n)
    chunks = [8, 8, 7]
    jobs = [Job("single", x, max_new_tokens=n, generation=gen),
            Job("sp", x, chunks=chunks, max_new_tokens=n, generation=gen),
            Job("astra", x, codebooks=cb, chunks=chunks, max_new_tokens=n, generation=gen),
            # the lean decoder (astra.decode) on the decoding rank
            Job("single", x, max_new_tokens=n, generation=gen, decode_weights="fp32",
                name="lean"),
            Job("astra", x, codebooks=cb, chunks=chunks, max_new_tokens=n, generation=gen,
                decode_weights="fp32", name="lean"),
            Job("astra", x, codebooks=cb, chunks=chunks, max_new_tokens=n, generation=gen,
                decode_weights="int8", name="int8")]
    streamed = []
    res = launch(spec, jobs, 3, stream=streamed.append)
    out = {(j.strategy + (f"-{j.name}" if j.name else "")):
           [r["generation"] for r in rr if r["generation"]] for j, rr in zip(jobs, res)}
    return dict(ref=ref[0], sim=sim, out=out, streamed=streamed, res=res, n=n)


def test_runner_generates_what_the_simulation_does(runs):
    got = runs["out"]["astra"]
    assert len(got) == 1  # one rank decodes
    assert torch.equal(got[0]["tokens"], runs["sim"])
    assert not torch.equal(got[0]["tokens"], runs["ref"])


@pytest.mark.parametrize("job", ["single-lean", "astra-lean"])
def test_runner_lean_decoder_generates_the_same_tokens(runs, job):
    """``decode_weights="fp32"``: the decoding rank's lean decoder gives the tokens of
    HF's forward (one device: HF's greedy; astra: the simulation's)."""
    want = runs["ref"] if job.startswith("single") else runs["sim"]
    assert torch.equal(runs["out"][job][0]["tokens"], want)


def test_runner_int8_decoder_generates(runs):
    g = runs["out"]["astra-int8"][0]
    assert g["new_tokens"] == runs["n"] and g["remote_tokens"] == 16


@pytest.mark.parametrize("strategy", ["single", "sp"])
def test_exact_strategies_generate_hf_greedy(runs, strategy):
    assert torch.equal(runs["out"][strategy][0]["tokens"], runs["ref"])


def test_runner_streams_every_token_and_reports_the_cache(runs):
    passes, cur = [], []
    for ids in runs["streamed"]:
        if ids:
            cur += ids
        else:
            passes.append(cur)
            cur = []
    assert passes == [runs["out"][s][0]["tokens"].tolist() for s in
                      ("single", "sp", "astra", "single-lean", "astra-lean", "astra-int8")]
    g = runs["out"]["astra"][0]
    assert g["remote_tokens"] == 16 and g["new_tokens"] == runs["n"]
    # fp16 K/V of 16 tokens: 2 layers x (K and V) x 2 KV heads x 16 dims x 2 bytes
    assert g["remote_kv_fp16_bytes"] == 16 * 2 * 2 * 2 * 16 * 2
    assert g["remote_kv_bytes"] == 2 * math.ceil(16 * 2 * 4 / 8)
    assert 0 < g["prefill_s"] <= g["ttft_s"] and g["decode_tok_s"] > 0
    assert runs["res"][2][2]["chunks"] == [8, 8, 7]


def test_generation_job_refuses_what_it_cannot_do():
    spec = ModelSpec(factories.tiny_llama)
    from astra.parallel.job import RunnerError
    with pytest.raises(RunnerError, match="generation needs"):
        launch(spec, [Job("tp", _ids(12), max_new_tokens=2)], 2)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a real tokenizer (MiniLM's) as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from astra.catalog.inputs import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_generate_writes_its_summary(tiny_folder, tmp_path, monkeypatch, capsys):
    from astra.cli import main
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "g.json"
    assert main(["generate", "--model", str(tiny_folder), "--devices", "2", "--strategy",
                 "sp", "--prompt", "the quick brown fox jumps over the lazy dog",
                 "--max-new-tokens", "4", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    for k in ("text", "ttft_ms", "decode_tok_s", "bytes_per_device", "remote_kv_bytes",
              "remote_kv_fp16_bytes", "devices", "strategy"):
        assert k in row
    assert row["devices"] == 2 and row["strategy"] == "sp" and row["bytes_per_device"] > 0
    printed = capsys.readouterr().out
    assert printed.startswith(row["text"]) and "TTFT" in printed


@pytest.mark.parametrize("argv, msg", [
    (["--prompt-file", "/nonexistent/p.txt"], "no such file"),
    (["--prompt", "x y z", "--top-p", "0.9"], "--top-p needs --temperature"),
    (["--prompt", "x y z", "--model", "minilm"], "needs a causal LM"),
])
def test_cli_generate_refuses_bad_input_in_one_line(argv, msg, capsys):
    from astra.cli import main
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_cli_generate_refuses_unknown_decode_weights(capsys):
    from astra.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x y z", "--decode-weights", "int4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--decode-weights: invalid choice: 'int4'" in err and len(err.splitlines()) == 1


def test_bench_e2e_decode_rows(tiny_folder, tmp_path, monkeypatch, capsys):
    """``astra bench e2e --decode N``: generation rows for single and astra beside HF's
    own generate, on the same prompt."""
    from astra.bench import e2e
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    rows = e2e.run_grid(str(tiny_folder), 2, [10.0], 0.5, ["single", "astra"], ["fp32"],
                        link="virtual", tokens=24, repeats=1, warmup=0, decode_tokens=3)
    dec = {r["strategy"]: r for r in rows if r["wire"] == "decode"}
    assert set(dec) == {"single", "astra", "hf generate"}
    assert all(r["new_tokens"] == 3 and r["decode_tok_s"] > 0 for r in dec.values())
    assert dec["astra"]["remote_kv_bytes"] > 0 and dec["single"]["remote_kv_bytes"] == 0
    assert dec["astra"]["remote_kv_fp16_bytes"] > dec["astra"]["remote_kv_bytes"]
    assert "vs HF" in capsys.readouterr().out
