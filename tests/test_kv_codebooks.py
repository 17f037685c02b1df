"""Codebooks of keys and values (``target="kv"``): each token's pre-RoPE key and value,
``[k; v]``, quantized jointly instead of its attention input X. Checked against the
layers' own projections, the unpatched model (a codebook holding every token is
lossless), the differentiable path, the file format, generation and the runner."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import astra
from astra.calibrate import Method, cache_path, calibrate, fit_residual
from astra.catalog import factories
from astra.codebooks import Codebooks, collect_activations, kv_activations
from astra.finetune import NoiseAugmentedQuantizer
from astra.models import resolve
from astra.parallel import wire
from astra.parallel.runner import Job, ModelSpec, default_chunks, launch
from tests.test_generation import decode_and_full
from tests.test_llama import seam_forward

TOL = dict(rtol=1e-5, atol=1e-5)


def narrow_llama():
    """One KV head of 16: ``[k; v]`` is 32 wide against X's 64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                      vocab_size=101, max_position_embeddings=256, initializer_range=0.15,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


FACTORIES = {"llama": factories.tiny_llama, "qwen3": factories.tiny_qwen3,
             "narrow": narrow_llama}


def _ids(T, B=2, seed=0):
    return torch.randint(1, 101, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    return model(x, use_cache=False).logits


def _kv(model, x):
    with torch.no_grad():
        return kv_activations(model, collect_activations(model, [x]))


def _kv_codebooks(model, G=2, K=16, stages=None):
    acts = _kv(model, _ids(40, seed=1))
    if stages is not None:
        return fit_residual(acts, stages, iters=4, progress=False, model=model, target="kv")
    return Codebooks.fit(acts, G, K, iters=4, progress=False, model=model, target="kv")


def _patched(model, x, cb, devices, **kw):
    astra.patch(model, cb, devices, **kw)
    try:
        with torch.no_grad():
            return _logits(model, x)
    finally:
        astra.unpatch(model)


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    model = FACTORIES[request.param]()
    x = _ids(17)
    with torch.no_grad():
        ref = _logits(model, x)
    return dict(name=request.param, model=model, x=x, ref=ref)


def test_kv_activations_are_each_layers_keys_and_values(family):
    model, x = family["model"], family["x"]
    acts = collect_activations(model, [x])
    kv = kv_activations(model, acts)
    for layer, a, u in zip(model.model.layers, acts, kv):
        att = layer.self_attn
        with torch.no_grad():
            k = att.k_proj(a)
            if getattr(att, "k_norm", None) is not None:  # qwen3: per-head norm before RoPE
                k = att.k_norm(k.view(-1, k.shape[-1] // 16, 16)).flatten(1)
            want = torch.cat([k, att.v_proj(a)], dim=-1)
        torch.testing.assert_close(u, want, **TOL)
    ident = resolve(model)[1].identity(model)
    assert kv[0].shape[-1] == ident["kv_dim"] == 2 * model.config.num_key_value_heads * 16


@pytest.mark.parametrize("kernels", [None, False])
def test_a_codeword_for_every_token_is_lossless(family, kernels):
    """Every remote token's own [k; v] is a codeword: N devices compute what one does
    (the layout of heads and halves and the rotation at global positions are right)."""
    model, x, ref = family["model"], family["x"], family["ref"]
    own = Codebooks(torch.stack([u.unsqueeze(0) for u in _kv(model, x)]), target="kv")
    torch.testing.assert_close(_patched(model, x, own, 3, use_kernels=kernels), ref, **TOL)
    few = Codebooks(own.tensor[:, :, :4].clone(), target="kv")
    assert (_patched(model, x, few, 3, use_kernels=kernels) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["G1", "G2", "residual"])
def test_kernels_and_the_differentiable_path_agree(family, layout):
    model, x, ref = family["model"], family["x"], family["ref"]
    cb = _kv_codebooks(model, **{"G1": dict(G=1), "G2": dict(G=2),
                                 "residual": dict(stages=(16, 4))}[layout])
    assert cb.target == "kv"
    kern = _patched(model, x, cb, 3)
    slow = _patched(model, x, cb, 3, use_kernels=False)
    torch.testing.assert_close(kern, slow, rtol=1e-4, atol=1e-4)
    assert (kern - ref).abs().max() > 1e-3
    first = -(-x.shape[1] // 3)  # the first chunk sees no remote token
    torch.testing.assert_close(kern[:, :first], ref[:, :first], **TOL)


def test_gradients_reach_the_kv_codebook_and_through_naq_the_weights():
    model = factories.tiny_llama()
    x = _ids(17)
    cb = _kv_codebooks(model)
    astra.patch(model, cb, 2)
    try:
        attn = model.model.layers[1].self_attn
        attn.codebook.requires_grad_(True)
        _logits(model, x).float().pow(2).mean().backward()
        assert attn.codebook.grad is not None and attn.codebook.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
        # fine-tuning's quantizer (straight-through, noise) on [k; v]: W_k learns
        q = NoiseAugmentedQuantizer(noise=0.3, generator=torch.Generator().manual_seed(0))
        attn.quantizer = q
        model.train()
        _logits(model, x).float().pow(2).mean().backward()
        assert attn.k_proj.weight.grad.abs().sum() > 0
    finally:
        model.eval()
        attn.quantizer = None
        astra.unpatch(model)
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------- files
def test_file_round_trip_keeps_the_target_and_checks_the_kv_width(tmp_path):
    model = narrow_llama()
    cb = _kv_codebooks(model)
    path = tmp_path / "kv.safetensors"
    cb.save(path)
    back = Codebooks.load(path, expect=model)
    assert back.target == "kv" and back.dim == 32 and torch.equal(back.tensor, cb.tensor)
    with pytest.raises(ValueError, match=r"dim: .* have '32', expected '64'.*\[key; value\]"):
        Codebooks.load(path, expect=factories.tiny_llama())  # two KV heads: 64 wide
    with pytest.raises(ValueError, match=r"target: .* have 'kv', expected 'x'"):
        back.check({"target": "x"})
    with pytest.raises(ValueError, match="dim: codebooks have '64', expected '32'"):
        astra.patch(model, Codebooks(torch.zeros(2, 1, 4, 64), target="kv"), 2, strict=False)
    assert not astra.is_patched(model)
    ad = resolve(model)[1]
    layer = ad.build(model.model.layers[0].self_attn, 0, model)
    with pytest.raises(ValueError, match="must be 32 wide"):
        layer.configure(codebook=torch.zeros(1, 4, 64), devices=2, target="kv")
    # a file from before targets existed (no "target" field) holds X codebooks
    x_cb = Codebooks(torch.randn(2, 2, 4, 32))
    x_cb.save(path)
    meta = dict(x_cb.metadata())
    meta.pop("target")
    save_file(load_file(path), path, metadata=meta)
    assert Codebooks.load(path).target == "x"
    with pytest.raises(ValueError, match="target must be one of"):
        Codebooks(torch.zeros(1, 1, 2, 4), target="q")


def test_method_target_is_validated_described_and_keyed():
    model = factories.tiny_llama()
    assert "[k; v]" in Method(target="kv").describe()
    with pytest.raises(ValueError, match="target must be one of"):
        Method(target="keys")
    assert cache_path(model, Method(), "d", 4) != cache_path(model, Method(target="kv"), "d", 4)
    cb = calibrate(model, [_ids(40, seed=2)], Method(codebook_size=8, iters=2, target="kv"),
                   cache=False, progress=False)
    assert cb.target == "kv" and cb.dim == 64 and cb.codebook_size == 8


# -------------------------------------------------------------------- generation
def test_decode_step_equals_the_simulation_one_token_longer():
    model = factories.tiny_llama()
    x = _ids(23, B=1)
    astra.patch(model, _kv_codebooks(model), devices=3)
    try:
        step, full, _, cache = decode_and_full(model, x)
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
        assert cache.remote_tokens() == 16
    finally:
        astra.unpatch(model)


# ------------------------------------------------------------------- distributed
@pytest.mark.parametrize("overlap", [False, True])
def test_distributed_seam_matches_simulate(overlap):
    x = _ids(16)
    base = factories.tiny_qwen3()
    cb = _kv_codebooks(base)
    sim = _patched(base, x, cb, 3)
    torch.testing.assert_close(seam_forward(factories.tiny_qwen3, x, cb, overlap), sim, **TOL)


def test_the_runner_carries_kv_codes_at_their_widths():
    spec, world, T = ModelSpec(factories.tiny_llama), 3, 22
    model = spec.build()
    x = _ids(T)
    cb = _kv_codebooks(model, G=2, K=16)  # 2 x 4 bits per token and layer
    sim = _patched(model, x, cb, world)
    res = launch(spec, [Job("astra", x, codebooks=cb, chunks=default_chunks(T, world))], world)[0]
    torch.testing.assert_close(res[0]["output"], sim, **TOL)
    B = x.shape[0]
    for r, rr in enumerate(res):
        assert rr["bits_per_token"] == [8, 8]
        ex = [c for c in rr["collectives"] if c["what"].startswith("exchange")]
        assert len(ex) == 2
        for c in ex:
            assert re.match(r"exchange\[\d+\]", c["what"])
            frame = wire.HEADER_BYTES + math.ceil(B * rr["chunks"][r] * 8 / 8)
            assert c["sent"] == (world - 1 - r) * frame  # causal: later ranks only
