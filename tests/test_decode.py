"""Lean decode steps (:mod:`astra.decode`) against HF's forward and ``generate``, and the
device cache's buffers (:class:`astra.generation.AstraLayer`)."""

import pytest
import torch

import astra
from astra import decode
from astra.catalog import factories
from astra.generation import AstraCache, AstraLayer, cache_kw, greedy
from tests.test_generation import FACTORIES, _codebooks, _ids


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    return request.param, FACTORIES[request.param]()


def _prefill(model, x):
    cache = AstraCache()
    with torch.no_grad():
        model(x, use_cache=True, **{cache_kw(model): cache})
    return cache


def _steps(model, x, new, weights, prefill=None):
    """Logits of feeding ``new [1, n]`` one token at a time after prefilling ``x`` (by
    ``prefill``, default ``model``), by HF's forward (``weights`` None) or an installed
    decoder."""
    cache = _prefill(prefill or model, x)
    if weights:
        decode.install(model, weights)
    try:
        out = []
        with torch.no_grad():
            for i in range(new.shape[1]):
                out.append(model(new[:, i:i + 1], use_cache=True,
                                 **{cache_kw(model): cache}).logits[:, -1])
        return torch.stack(out, 1), cache
    finally:
        decode.uninstall(model)


@pytest.mark.parametrize("devices,coded", [(1, False), (3, True)])
def test_fp32_steps_give_hf_forward_logits(family, devices, coded):
    """fp32 decoder == the patched model's own forward, bit for bit (same modules, same
    kernels), with and without remote codes in the cache."""
    _, model = family
    x, new = _ids(23), _ids(5, seed=3)
    astra.patch(model, _codebooks(model) if coded else None, devices=devices)
    try:
        ref, rc = _steps(model, x, new, None)
        got, gc = _steps(model, x, new, "fp32")
    finally:
        astra.unpatch(model)
    assert torch.equal(got, ref)
    assert gc.get_seq_length() == rc.get_seq_length() == 28
    assert gc.remote_tokens() == rc.remote_tokens() == (16 if devices == 3 else 0)


def _dequantized(lin) -> torch.Tensor:
    """The float32 weight an int8 ``_Linear`` multiplies by: ``q * scale (+ offset)``."""
    return lin.fn.dequantize()


def _rounded(model):
    """A copy of ``model`` whose projections and LM head hold the int8 decoder's weights
    (dequantized, float32; the stacked q/k/v and gate/up split back): what the int8
    decoder multiplies by."""
    import copy
    dec = decode.Decoder(model, "int8")
    m = copy.deepcopy(model)
    for b, blk in zip(dec.blocks, m.model.layers):
        a, mlp = blk.self_attn, blk.mlp
        for group, mods in ((b.qkv, (a.q_proj, a.k_proj, a.v_proj)),
                            (b.gate_up, (mlp.gate_proj, mlp.up_proj))):
            for mod, w in zip(mods, _dequantized(group[0]).split(group[0].sizes)):
                mod.weight.data = w.clone()
        a.o_proj.weight.data = _dequantized(b.o)
        mlp.down_proj.weight.data = _dequantized(b.down)
    m.lm_head.weight = torch.nn.Parameter(_dequantized(dec.head))  # untied
    return m


def test_int8_steps_equal_the_model_with_rounded_weights(family):
    """int8 decoder == HF's forward of the same model with its weights rounded to int8
    (up to the kernels' 16-bit rounding of activations), and it reads under a third of
    the fp32 decoder's bytes (the scales and offsets included)."""
    _, model = family
    x, new = _ids(23), _ids(5, seed=3)
    astra.patch(model, None, devices=1)
    rounded = _rounded(model)
    try:
        ref, _ = _steps(rounded, x, new, None, prefill=model)  # prefill: fp32 weights
        fp32, _ = _steps(model, x, new, "fp32")
        got, _ = _steps(model, x, new, "int8")
        nbytes = {w: decode.Decoder(model, w).nbytes for w in ("fp32", "int8")}
    finally:
        astra.unpatch(model)
    spread = ref.std()
    assert (got - ref).abs().max() < 1e-3 * spread
    assert (fp32 - ref).abs().max() > 1e-2 * spread  # the rounding is what moved them
    # int8 with a float32 scale (and offset) per 32 weights: at most 1.25 bytes a weight
    assert nbytes["int8"] <= 1.25 / 4 * nbytes["fp32"]


def test_generate_with_the_decoder_gives_hf_greedy(family):
    """N = 1, fp32 decoder: HF ``generate`` with the decoder installed decodes HF's own
    greedy tokens (the unpatched model's)."""
    _, model = family
    x = _ids(23)
    ref = greedy(model, x, 8)
    astra.patch(model, None, devices=1)
    try:
        decode.install(model, "fp32")
        got = greedy(model, x, 8)
    finally:
        astra.unpatch(model)
    assert torch.equal(got, ref)


def test_install_uninstall_and_unpatch_restore_forward(family):
    _, model = family
    cls_forward = type(model).forward
    with pytest.raises(ValueError, match="not patched"):
        decode.install(model, "fp32")
    astra.patch(model, None, devices=1)
    try:
        with pytest.raises(ValueError, match="weights must be one of"):
            decode.install(model, "int4")
        dec = decode.install(model, "int8")
        assert decode.installed(model) is dec and "forward" in model.__dict__
        decode.uninstall(model)
        assert decode.installed(model) is None and "forward" not in model.__dict__
        decode.install(model, "fp32")
    finally:
        astra.unpatch(model)
    assert decode.installed(model) is None and type(model).forward is cls_forward
    assert "forward" not in model.__dict__


def test_decoder_leaves_other_calls_to_hf(family):
    """A prefill, a cache-less call and a padded step go to HF's forward: the prefill's
    logits are HF's, and padding is refused as before."""
    _, model = family
    x = _ids(23)
    astra.patch(model, None, devices=1)
    try:
        with torch.no_grad():
            ref = model(x).logits
        decode.install(model, "int8")
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref)  # no cache: not a decode step
            cache = _prefill(model, x)
            mask = torch.ones(1, 24, dtype=torch.long)
            mask[0, 0] = 0
            with pytest.raises(NotImplementedError, match="padded"):
                model(_ids(1), attention_mask=mask, **{cache_kw(model): cache})
    finally:
        astra.unpatch(model)


def test_decoder_refuses_other_families():
    model = factories.tiny_gpt2()
    astra.patch(model, None, devices=1)
    try:
        with pytest.raises(ValueError, match="Llama family"):
            decode.install(model, "int8")
    finally:
        astra.unpatch(model)


# ------------------------------------------------------------------- cache buffers

def test_layer_buffers_grow_in_place_and_mask_unwritten_rows():
    layer = AstraLayer()
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    layer.append(k, v, torch.arange(5))
    kb, vb, pb = layer.buffers()
    cap = kb.shape[2]
    assert cap >= 5 + AstraLayer.ROWS and cap % AstraLayer.ROWS == 0
    assert torch.equal(kb[:, :, :5], k) and bool((pb[5:] == AstraLayer.UNSET).all())
    for t in range(5, cap):  # filling the room: no new buffer
        layer.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.tensor([t]))
    assert layer.buffers()[0].data_ptr() == kb.data_ptr()
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # one more: it grows
    kb2, _, pb2 = layer.buffers()
    assert kb2.shape[2] >= 2 * cap and torch.equal(kb2[:, :, :5], k)
    assert torch.equal(pb2[:cap + 1], torch.arange(cap + 1))
    assert layer.get_seq_length() == cap + 1 and torch.equal(layer.keys, kb2[:, :, :cap + 1])


def test_layer_buffers_follow_hf_edits():
    """HF's own cache edits (crop, batch selection) replace ``keys``/``values``; the
    buffers are rebuilt from them before the next use."""
    layer = AstraLayer()
    k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    layer.append(k, v, torch.arange(6))
    layer.crop(-2)
    kb, vb, pb = layer.buffers()
    assert layer.get_seq_length() == 4 and torch.equal(kb[:, :, :4], k[:, :, :4])
    assert torch.equal(pb[:4], torch.arange(4)) and bool((pb[4:] == AstraLayer.UNSET).all())
    layer.batch_select_indices(torch.tensor([1]))
    kb, vb, _ = layer.buffers()
    assert kb.shape[0] == 1 and torch.equal(vb[:, :, :4], v[1:, :, :4])
