"""AstraAttention: chunk layout, the kernel path vs the differentiable path, the
projected-table identity, gradients, and the distributed seam (fake communicator)."""
import threading

import pytest
import torch

import astra
import astra_kernels
from astra.attention import AstraAttention, chunk_layout

# ----------------------------------------------------------------------------- models

def _gpt2(layers=2, seed=0):
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=97,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def _bert(seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _vit():
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=32, patch_size=8)
    return ViTModel(cfg).eval()


def _timm(**kw):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             num_classes=5, **kw).eval()


def _case(name):
    """(model, inputs dict, output fn, valid-token mask or None)."""
    g = torch.Generator().manual_seed(1)
    if name == "gpt2":
        ids = torch.randint(0, 97, (2, 13), generator=g)
        am = torch.ones_like(ids)
        am[0, :3] = 0  # left padding
        return _gpt2(), dict(input_ids=ids, attention_mask=am), lambda o: o.last_hidden_state, am
    if name == "bert":
        ids = torch.randint(0, 97, (2, 11), generator=g)
        am = torch.ones_like(ids)
        am[1, 7:] = 0  # right padding
        return _bert(), dict(input_ids=ids, attention_mask=am), lambda o: o.last_hidden_state, am
    px = torch.randn(2, 3, 32, 32, generator=g)
    if name == "vit":
        return _vit(), dict(pixel_values=px), lambda o: o.last_hidden_state, None
    if name == "timm":
        return _timm(), dict(x=px), lambda o: o, None
    if name == "timm_qknorm":
        return _timm(qk_norm=True), dict(x=px), lambda o: o, None
    raise KeyError(name)


class _PathSpy:
    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("_simulate_torch", "_simulate_kernel"):
            orig = getattr(AstraAttention, name)

            def wrap(mod, *a, _o=orig, _n=name, **k):
                self.calls.append(_n)
                return _o(mod, *a, **k)
            monkeypatch.setattr(AstraAttention, name, wrap)


# ----------------------------------------------------------------------------- layout

def test_chunk_layout_splits_like_tensor_split():
    lay = chunk_layout(10, 4)
    want = torch.tensor_split(torch.arange(10), 4)
    assert [t.tolist() for t in lay.local_idx] == [t.tolist() for t in want]
    assert lay.remote_idx[1].tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert lay.copies == 0 and lay.length == 10


def test_chunk_layout_with_class_token_copies():
    lay = chunk_layout(8, 3, cls_copies=True)  # [c0 c1 c2 | t1..t7] -> 10 tokens
    assert lay.length == 10 and lay.copies == 3 and lay.orig_length == 8
    assert lay.orig_index.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert lay.local_idx[0].tolist() == [0, 3, 4, 5]
    assert lay.local_idx[2].tolist() == [2, 8, 9]
    assert lay.remote_idx[0].tolist() == [6, 7, 8, 9]  # copies are never remote
    with pytest.raises(ValueError, match="larger than the sequence"):
        chunk_layout(4, 4, cls_copies=True)


# --------------------------------------------------------------- kernels vs torch path

@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "timm", "timm_qknorm"])
def test_kernel_path_equals_differentiable_path(name, monkeypatch):
    model, inputs, out, am = _case(name)
    acts = astra.collect_activations(model, [inputs])
    cb = astra.Codebooks.fit(acts, groups=2, codebook_size=8, iters=4, progress=False)
    with torch.no_grad():
        ref = out(model(**inputs))
    astra.patch(model, cb, devices=3)
    spy = _PathSpy(monkeypatch)
    with torch.no_grad():
        fast = out(model(**inputs))
    assert set(spy.calls) == {"_simulate_kernel"}
    spy.calls.clear()
    slow = out(model(**inputs))
    assert slow.requires_grad and set(spy.calls) == {"_simulate_torch"}
    m = (slice(None),) if am is None else (am.bool(),)
    assert (fast - slow.detach())[m].abs().max() < 1e-5
    assert (fast - ref)[m].abs().max() > 1e-3  # the codebooks are coarse: N=3 differs


def test_projected_tables_are_the_key_identity():
    """k̂ = Σ_g P_k[g, c_g] + b_k equals projecting the dequantized input."""
    model = _gpt2(layers=1)
    x = torch.randn(2, 9, 32)
    cb = astra.Codebooks.fit([x], groups=4, codebook_size=6, iters=2, progress=False)
    astra.patch(model, cb, devices=2)
    attn = model.h[0].attn
    with torch.no_grad():
        codes = attn.encode(x)
        pk, pv = attn.projected_tables()
        k_tab, v_tab, _ = astra_kernels.reference.dequantize_remote(codes, pk, pv)
        k, v = attn.project_kv(attn.dequantize(codes, x.dtype))
    assert pk.shape == (4, 6, 4, 8)
    torch.testing.assert_close(k_tab, k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_tab, v, atol=1e-5, rtol=1e-5)
    assert attn.projected_tables()[0] is pk  # cached until the weights change
    with torch.no_grad():
        attn.c_attn.weight.add_(0.01)
    assert attn.projected_tables()[0] is not pk


def test_simulate_is_differentiable_into_weights_and_codebooks():
    model, inputs, out, _ = _case("bert")
    acts = astra.collect_activations(model, [inputs])
    cb = astra.Codebooks.fit(acts, groups=2, codebook_size=8, iters=2, progress=False)
    astra.patch(model, cb, devices=3)
    model.train()
    for layer in model.encoder.layer:
        layer.attention.self.codebook.requires_grad_(True)
    out(model(**inputs)).pow(2).mean().backward()
    attn = model.encoder.layer[1].attention.self
    assert attn.codebook.grad is not None and attn.codebook.grad.abs().sum() > 0
    assert attn.key.weight.grad is not None and torch.isfinite(attn.key.weight.grad).all()


def test_use_kernels_true_refuses_autograd():
    model, inputs, out, _ = _case("vit")
    astra.patch(model, devices=2, use_kernels=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        out(model(**inputs))
    with torch.no_grad():
        out(model(**inputs))


# ------------------------------------------------------------------ distributed seam

class _Hub:
    """In-process stand-in for the runner's all-gather: ranks are threads."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = {}
        self.sent = []

    def comm(self, rank):
        hub = self

        class _Comm:
            def __init__(self):
                self.rank, self.world_size = rank, hub.world

            def exchange(self, layer_idx, local):
                hub.slots[(layer_idx, rank)] = local
                hub.sent.append((rank, layer_idx, local.dtype, tuple(local.shape)))
                hub.barrier.wait()
                got = [hub.slots[(layer_idx, r)] for r in range(hub.world)]
                hub.barrier.wait()
                return got
        return _Comm()


def _run_ranks(models, inputs):
    outs, errs = [None] * len(models), []

    def work(r):
        try:
            with torch.no_grad():
                outs[r] = models[r](**inputs[r]).last_hidden_state
        except BaseException as e:  # surface in the main thread
            errs.append(e)
            raise
    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errs:
        raise errs[0]
    return outs


def test_distributed_seam_gpt2_matches_simulate():
    N = 3
    base = _gpt2()
    ids = torch.randint(0, 97, (2, 14))
    cb = astra.Codebooks.fit(astra.collect_activations(base, [ids]), groups=2,
                             codebook_size=8, iters=3, progress=False)
    astra.patch(base, cb, devices=N)
    with torch.no_grad():
        sim = base(ids, use_cache=False).last_hidden_state
    astra.unpatch(base)

    hub = _Hub(N)
    chunks = torch.tensor_split(torch.arange(14), N)
    models, inputs = [], []
    for r in range(N):
        m = _gpt2()
        m.load_state_dict(base.state_dict())
        models.append(astra.patch(m, cb, communicator=hub.comm(r)))
        inputs.append(dict(input_ids=ids[:, chunks[r]], use_cache=False,
                           position_ids=chunks[r].unsqueeze(0).expand(2, -1)))
    outs = _run_ranks(models, inputs)
    torch.testing.assert_close(torch.cat(outs, dim=1), sim, atol=2e-5, rtol=1e-4)
    # Only codes crossed: int32 [B, T_r, G].
    assert {s[2] for s in hub.sent} == {torch.int32}
    assert {(s[0], s[3]) for s in hub.sent} == {(r, (2, len(chunks[r]), 2)) for r in range(N)}


def test_distributed_seam_bert_class_token_copies_match_simulate():
    """Rank r runs [CLS] + its chunk; the copies' mean equals simulate's pooled CLS."""
    N = 3
    base = _bert()
    ids = torch.randint(0, 97, (1, 12))
    cb = astra.Codebooks.fit(astra.collect_activations(base, [ids]), groups=1,
                             codebook_size=8, iters=3, progress=False)
    astra.patch(base, cb, devices=N)  # distributed_cls on by default for BERT
    with torch.no_grad():
        sim = base(ids).last_hidden_state
    astra.unpatch(base)

    hub = _Hub(N)
    chunks = torch.tensor_split(torch.arange(1, 12), N)
    models, inputs = [], []
    for r in range(N):
        m = _bert()
        m.load_state_dict(base.state_dict())
        models.append(astra.patch(m, cb, communicator=hub.comm(r)))
        pos = torch.cat([torch.zeros(1, dtype=torch.long), chunks[r]])
        inputs.append(dict(input_ids=ids[:, pos], position_ids=pos.unsqueeze(0)))
    outs = _run_ranks(models, inputs)
    pooled_cls = torch.stack([o[:, 0] for o in outs]).mean(0)
    tokens = torch.cat([o[:, 1:] for o in outs], dim=1)
    torch.testing.assert_close(pooled_cls, sim[:, 0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, sim[:, 1:], atol=2e-5, rtol=1e-4)
    # The class-token copy is never sent: rank r sends exactly its chunk's tokens.
    assert {(s[0], s[3][1]) for s in hub.sent} == {(r, len(chunks[r])) for r in range(N)}


def test_hf_two_dimensional_padding_mask_equals_the_four_dimensional_one():
    """A ``[B, T]`` keep-mask (what flash-attention HF models pass) works like the 4-D one."""
    model = _bert()
    x = torch.randn(2, 9, 32)
    cb = astra.Codebooks.fit([x, x], groups=2, codebook_size=8, iters=2, progress=False)
    astra.patch(model, cb, devices=3, distributed_cls=False)
    attn = model.encoder.layer[0].attention.self
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, 6:] = 0
    four = am.bool()[:, None, None, :].expand(2, 1, 9, 9)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            a = attn(x, attention_mask=am)[0].detach()
            b = attn(x, attention_mask=four)[0].detach()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
