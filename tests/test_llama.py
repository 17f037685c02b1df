"""Llama-family models (HF llama, mistral, qwen2, qwen3): RoPE + GQA in simulate mode and
through the runner, against the unpatched HF model and an independent one-layer oracle."""

import inspect
import threading
import types

import pytest
import torch

import astra
import astra_kernels
from astra import catalog, remote
from astra.catalog import factories
from astra.models import resolve
from astra.parallel.runner import Job, ModelSpec, default_chunks, launch

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_mistral(seed: int = 0, layers: int = 2, window: int = 64):
    from transformers import MistralConfig, MistralForCausalLM
    return factories._tiny_decoder(MistralConfig, MistralForCausalLM, seed, layers,
                                   sliding_window=window)


FACTORIES = {"llama": factories.tiny_llama, "qwen2": factories.tiny_qwen2,
             "qwen3": factories.tiny_qwen3, "mistral": tiny_mistral}


def _ids(T, B=2, seed=0):
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    return model(x, use_cache=False).logits


def _codebooks(model, x, G=2, K=16):
    return astra.Codebooks(catalog.quick_codebooks(model, x, G=G, K=K))


@pytest.fixture(scope="module", params=list(FACTORIES))
def family(request):
    model = FACTORIES[request.param]()
    x = _ids(17)
    with torch.no_grad():
        ref = _logits(model, x)
        cb = _codebooks(model, _ids(40, seed=1))
    return dict(name=request.param, model=model, x=x, ref=ref, cb=cb)


def _patched(model, x, *args, grad=False, **kw):
    astra.patch(model, *args, **kw)
    try:
        with torch.set_grad_enabled(grad):
            return _logits(model, x).detach()
    finally:
        astra.unpatch(model)


# ------------------------------------------------------------------------ patch face

def test_model_types_resolve_to_one_adapter(family):
    key, ad = resolve(family["model"])
    assert key == family["name"] and ad.family == "hf:llama"
    assert ad.identity(family["model"])["model"] == f"hf:{family['name']}"


@pytest.mark.parametrize("kernels", [None, False])
def test_n1_equals_original_and_unpatch_restores(family, kernels):
    model, x = family["model"], family["x"]
    before = [layer.self_attn for layer in model.model.layers]
    keys = list(model.state_dict())
    astra.patch(model, use_kernels=kernels)
    try:
        assert list(model.state_dict()) == keys  # same names: the same weight modules
        with torch.no_grad():
            out = _logits(model, x)
    finally:
        astra.unpatch(model)
    torch.testing.assert_close(out, family["ref"], **TOL)
    assert all(a is b for a, b in zip(before, [la.self_attn for la in model.model.layers]))
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, x), family["ref"], rtol=0, atol=0)


@pytest.mark.parametrize("devices", [2, 3])
@pytest.mark.parametrize("kernels", [None, False])
def test_exact_remote_context_equals_original(family, devices, kernels):
    # no codebook: remote tokens at full precision, keys rotated at their own positions
    out = _patched(family["model"], family["x"], None, devices, use_kernels=kernels)
    torch.testing.assert_close(out, family["ref"], **TOL)


@pytest.mark.parametrize("devices", [2, 3])
def test_codebooks_change_the_output_and_paths_agree(family, devices):
    model, x, cb = family["model"], family["x"], family["cb"]
    kern = _patched(model, x, cb, devices)                      # kernels (no_grad)
    torch_ = _patched(model, x, cb, devices, use_kernels=False)  # differentiable path
    torch.testing.assert_close(kern, torch_, rtol=1e-4, atol=1e-4)
    assert (kern - family["ref"]).abs().max() > 1e-3  # not vacuous
    # the first chunk sees no remote token: its logits are exact
    first = -(-x.shape[1] // devices)
    torch.testing.assert_close(kern[:, :first], family["ref"][:, :first], **TOL)


def test_gradients_reach_the_codebook(family):
    model, x = family["model"], family["x"]
    cb = astra.Codebooks(family["cb"].tensor.clone())
    astra.patch(model, cb, 2)
    try:
        attn = model.model.layers[1].self_attn
        attn.codebook.requires_grad_(True)
        _logits(model, x).float().pow(2).mean().backward()
        assert attn.codebook.grad is not None and attn.codebook.grad.abs().sum() > 0
    finally:
        astra.unpatch(model)
        model.zero_grad(set_to_none=True)


def test_gqa_shapes(family):
    model = family["model"]
    astra.patch(model, family["cb"], 2)
    try:
        attn = model.model.layers[0].self_attn
        h = torch.randn(2, 5, 64)
        assert attn.num_heads == 4 and attn.num_kv_heads == 2 and attn.head_dim == 16
        assert attn.project_q(h).shape == (2, 4, 5, 16)
        k, v = attn.project_kv(h)
        assert k.shape == v.shape == (2, 2, 5, 16)
        tabs = attn.projected_tables()
        if family["name"] == "qwen3":
            assert tabs is None  # k_norm: not affine, and G=2
        else:
            assert tabs.pk.shape == tabs.pv.shape == (2, 16, 2, 16)  # per KV head
    finally:
        astra.unpatch(model)


def test_qwen3_g1_tables_are_the_normed_keys():
    model = factories.tiny_qwen3()
    with torch.no_grad():
        cb = _codebooks(model, _ids(40, seed=1), G=1, K=16)
    astra.patch(model, cb, 2)
    try:
        attn = model.model.layers[0].self_attn
        E = attn.codebook[0]
        pk, pv = attn.projected_tables()
        with torch.no_grad():
            k = attn.k_norm(attn.k_proj(E).view(16, 2, 16))
            v = attn.v_proj(E).view(16, 2, 16)
        torch.testing.assert_close(pk[0], k, **TOL)
        torch.testing.assert_close(pv[0], v, **TOL)
    finally:
        astra.unpatch(model)


def test_one_layer_against_an_independent_oracle():
    """Layer 0 of tiny llama at N=3 with codes, built from HF's own pieces: queries and
    local keys rotated at their positions, remote keys k_proj(X̂) rotated at theirs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = factories.tiny_llama()
    x = _ids(14)
    with torch.no_grad():
        cb = _codebooks(model, _ids(40, seed=1))
    orig = model.model.layers[0].self_attn
    with torch.no_grad():
        X = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
        pos = torch.arange(14)
        cos, sin = model.model.rotary_emb(X, pos[None])
        astra.patch(model, cb, 3)
        try:
            attn = model.model.layers[0].self_attn
            got = attn(X, position_embeddings=(cos, sin))[0]
            got_torch = attn(X, position_embeddings=None)[0]  # cos/sin from rotary_emb
            Xq = attn.dequantize(attn.encode(X), X.dtype)
        finally:
            astra.unpatch(model)

        def proj(lin, t, n):
            return lin(t).view(2, 14, n, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(proj(orig.q_proj, X, 4), proj(orig.k_proj, X, 2), cos, sin)
        _, kq = apply_rotary_pos_emb(q, proj(orig.k_proj, Xq, 2), cos, sin)
        v, vq = proj(orig.v_proj, X, 2), proj(orig.v_proj, Xq, 2)
        owner = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 5, 4]))
        same = owner[:, None] == owner[None, :]
        K_ = torch.where(same[None, None, :, :, None], k[:, :, None], kq[:, :, None])
        V_ = torch.where(same[None, None, :, :, None], v[:, :, None], vq[:, :, None])
        K_, V_ = K_.repeat_interleave(2, 1), V_.repeat_interleave(2, 1)  # [B, H, Tq, Tk, d]
        s = torch.einsum("bhqd,bhqkd->bhqk", q, K_) / 4.0
        s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        o = torch.einsum("bhqk,bhqkd->bhqd", s.softmax(-1), V_)
        want = orig.o_proj(o.transpose(1, 2).reshape(2, 14, 64))
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_torch, want, **TOL)


def test_sliding_window_longer_than_the_sequence_is_refused():
    model = tiny_mistral(window=8)
    astra.patch(model, None, 2)
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding window"):
            _logits(model, _ids(12))
    finally:
        astra.unpatch(model)


@pytest.mark.skipif("rope_cos" not in inspect.signature(astra_kernels.mixed_attention).parameters,
                    reason="mixed_attention has no rope_cos/rope_sin yet")
def test_kernel_rotation_of_table_keys_when_switched_on(family, monkeypatch):
    # ROPE_IN_KERNEL: codes + tables + cos/sin go to the kernel, which rotates the keys
    model, x, cb = family["model"], family["x"], family["cb"]
    if family["name"] == "qwen3":  # k_norm: tables only at G=1 (each codeword's key)
        with torch.no_grad():
            cb = _codebooks(model, _ids(40, seed=1), G=1, K=16)
    off = _patched(model, x, cb, 3)
    monkeypatch.setattr(remote, "ROPE_IN_KERNEL", True)
    on = _patched(model, x, cb, 3)
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ runner

RUNS = {  # name: (factory, world, tokens): uneven chunks everywhere
    "llama-N2": (factories.tiny_llama, 2, 23),
    "llama-N3": (factories.tiny_llama, 3, 22),
    "qwen3-N2": (factories.tiny_qwen3, 2, 21),
    "qwen3-N3": (factories.tiny_qwen3, 3, 20),
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request):
    factory, world, T = RUNS[request.param]
    spec = ModelSpec(factory)
    model = spec.build()
    x = _ids(T)
    with torch.no_grad():
        cb = catalog.quick_codebooks(model, x, G=2, K=16)
        ref = _logits(model, x)
    sim = _patched(model, x, astra.Codebooks(cb), world)
    odd = [1] * (world - 1) + [T - world + 1]
    eq = default_chunks(T, world)  # the simulation's split (the runner's is cost-balanced)
    jobs = [Job("astra", x, codebooks=cb, chunks=eq, name="astra"),
            Job("astra", x, codebooks=cb, chunks=eq, output="compact", name="astra-compact"),
            Job("sp", x, name="sp"), Job("sp", x, chunks=odd, name="sp-odd"),
            Job("single", x, name="single"), Job("tp", x, name="tp")]
    res = launch(spec, jobs, world)
    return dict(ref=ref, sim=sim, res={j.name: r for j, r in zip(jobs, res)})


def test_distributed_equals_simulate(run):
    out = run["res"]["astra"][0]["output"]
    torch.testing.assert_close(out, run["sim"], **TOL)
    assert (run["sim"] - run["ref"]).abs().max() > 1e-3
    compact = run["res"]["astra-compact"][0]["output"]
    torch.testing.assert_close(compact, run["sim"][:, -1], **TOL)


@pytest.mark.parametrize("name", ["sp", "sp-odd", "single", "tp"])
def test_baselines_equal_the_unpatched_model(run, name):
    torch.testing.assert_close(run["res"][name][0]["output"], run["ref"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("world", [2, 3])
def test_tp_blocks_equal_the_model_in_process(name, world):
    from astra.parallel.tp import TPBlock
    model, x = FACTORIES[name](), _ids(13)
    ad = resolve(model)[1]

    class Partial:  # every rank's TPBlock in one process: the all-reduce is the sum below
        def allreduce(self, t, what=""):
            return t

    with torch.no_grad():
        h = ad.embed(model, x, 0, 13, False)
        for blk in ad.layers(model):
            ranks = [TPBlock(r, world, Partial(), **ad.tp_spec(model, blk))
                     for r in range(world)]
            assert ranks[0].s.bo is None and ranks[0].s.b2 is None  # (added once, not per rank)
            a = blk.input_layernorm(h)
            h = h + sum(rb._attn(a) for rb in ranks)
            m = blk.post_attention_layernorm(h)
            h = h + sum(rb._mlp(m) for rb in ranks)
        out = ad.tail(model, h)
        torch.testing.assert_close(out, _logits(model, x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------- distributed in one process (threads)

def chunk_forward(ad, model, x, chunks, r):
    """Rank ``r``'s chunk of ``x`` through every block of the patched ``model``, then the
    tail (the thread tests' stand-in for the worker's forward)."""
    lo = sum(chunks[:r])
    with torch.no_grad():
        h = ad.embed(model, x, lo, lo + chunks[r], False)
        for blk in ad.layers(model):
            h = ad.run_block(model, blk, h)
        return ad.tail(model, h)


class _Hub:
    """The runner's all-gather with ranks as threads; ``overlap`` adds the
    ``exchange_start`` / ``send_tokens`` face that the overlapped path uses."""

    def __init__(self, chunks, overlap):
        self.chunks, self.overlap = chunks, overlap
        self.barrier = threading.Barrier(len(chunks), timeout=60)
        self.slots = {}

    def comm(self, rank):
        hub, W = self, len(self.chunks)

        class _Comm:
            def __init__(self):
                self.rank, self.world_size = rank, W
                if hub.overlap:
                    self.send_tokens = list(hub.chunks)
                    self.exchange_start = lambda i, local: types.SimpleNamespace(
                        wait=lambda got=self.exchange(i, local): got)

            def exchange(self, layer_idx, local):
                hub.slots[(layer_idx, rank)] = local
                hub.barrier.wait()
                got = [hub.slots[(layer_idx, r)] for r in range(W)]
                hub.barrier.wait()
                return got
        return _Comm()


def _threads(fn, n):
    outs, errs = [None] * n, []

    def work(r):
        try:
            outs[r] = fn(r)
        except BaseException as e:  # surface in the main thread
            errs.append(e)
            raise
    ts = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return outs


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("in_kernel", [False, True])
@pytest.mark.parametrize("with_codes", [False, True])
def test_distributed_seam_matches_simulate(overlap, in_kernel, with_codes, monkeypatch):
    if in_kernel and "rope_cos" not in inspect.signature(
            astra_kernels.mixed_attention).parameters:
        pytest.skip("mixed_attention has no rope_cos/rope_sin yet")
    monkeypatch.setattr(remote, "ROPE_IN_KERNEL", in_kernel)
    x = _ids(16)
    base = factories.tiny_llama()
    with torch.no_grad():
        cb = _codebooks(base, _ids(40, seed=1)) if with_codes else None
    sim = _patched(base, x, cb, 3)
    torch.testing.assert_close(seam_forward(factories.tiny_llama, x, cb, overlap), sim, **TOL)


def seam_forward(factory, x, cb, overlap, chunks=(6, 5, 5)):
    """``x`` through one model per rank (``factory``), ranks as threads joined by a
    :class:`_Hub`, each patched with ``cb`` in distributed mode; the default chunks are
    the simulation's split of 16 tokens (tensor_split)."""
    chunks = list(chunks)
    hub = _Hub(chunks, overlap)
    models = [factory() for _ in chunks]
    ad = resolve(models[0])[1]

    def rank(r):
        astra.patch(models[r], cb, communicator=hub.comm(r))
        return chunk_forward(ad, models[r], x, chunks, r)
    return torch.cat(_threads(rank, len(chunks)), dim=1)
