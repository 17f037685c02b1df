"""Codebooks: k-means fitting, files and their metadata checks, calibration."""
import pytest
import torch

import astra
import astra_kernels
from astra import Codebooks


def _blobs(n=400, d=8, centers=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 4
    return c[torch.randint(centers, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


def _gpt2(layers=2, width=32, vocab=97):
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=32, vocab_size=vocab,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


# ----------------------------------------------------------------------------- fitting

def test_fit_is_deterministic_for_a_seed():
    acts = [_blobs(seed=1), _blobs(seed=2)]
    a = Codebooks.fit(acts, groups=2, codebook_size=8, iters=5, seed=3, progress=False)
    b = Codebooks.fit(acts, groups=2, codebook_size=8, iters=5, seed=3, progress=False)
    c = Codebooks.fit(acts, groups=2, codebook_size=8, iters=5, seed=4, progress=False)
    assert a.tensor.shape == (2, 2, 8, 4)
    assert torch.equal(a.tensor, b.tensor) and a.history == b.history
    assert not torch.equal(a.tensor, c.tensor)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_reduces_error_vs_init(init):
    x = _blobs(n=600, d=16, centers=12)
    cb = Codebooks.fit([x], groups=2, codebook_size=12, iters=10, seed=0, init=init,
                       progress=False)
    h = cb.history[0]
    assert h[-1] < h[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:]))  # Lloyd never increases it
    assert cb.error(0, x) == pytest.approx(h[-1], rel=1e-5)


def test_assignment_step_goes_through_vq_encode(monkeypatch):
    calls = []
    real = astra_kernels.vq_encode

    def spy(*a, **k):
        calls.append(k.get("return_error", False))
        return real(*a, **k)
    monkeypatch.setattr(astra_kernels, "vq_encode", spy)
    Codebooks.fit([_blobs()], groups=1, codebook_size=4, iters=3, progress=False)
    assert calls and all(calls)


def test_empty_clusters_are_reseeded():
    # Half of the points are one repeated vector: a sampled init picks it several
    # times, and all but the first copy of it end the first iteration empty.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(200, 4), torch.randn(200, 4, generator=g) * 5])
    cb = Codebooks.fit([x], groups=1, codebook_size=16, iters=10, seed=0, init="random",
                       progress=False)
    assert cb.reseeded[0] > 0
    used = torch.unique(cb.encode(0, x))
    assert used.numel() == 16  # every cluster has points in the end


def test_fit_with_k_at_least_the_points_is_exact():
    x = torch.randn(20, 12)
    cb = Codebooks.fit([x], groups=3, codebook_size=24, iters=3, progress=False)
    assert cb.error(0, x) == 0.0
    torch.testing.assert_close(cb.decode(0, cb.encode(0, x)), x, rtol=0, atol=0)


def test_fit_rejects_groups_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="G=5 groups do not divide the width D=8"):
        Codebooks.fit([_blobs()], groups=5, codebook_size=4, progress=False)


def test_encode_decode_is_nearest_codeword():
    x = torch.randn(50, 6)
    cb = Codebooks(torch.randn(1, 2, 7, 3))
    codes = cb.encode(0, x)
    xq = cb.decode(0, codes)
    for g in range(2):
        d = torch.cdist(x[:, 3 * g:3 * g + 3], cb.tensor[0, g])
        torch.testing.assert_close(xq[:, 3 * g:3 * g + 3], cb.tensor[0, g][d.argmin(1)])
    assert cb.bits_per_token == 2 * 3


# ------------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    model = _gpt2()
    acts = [torch.randn(40, 32), torch.randn(40, 32)]
    cb = Codebooks.fit(acts, groups=4, codebook_size=8, iters=2, progress=False, model=model)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = Codebooks.load(path, expect=model)
    assert torch.equal(back.tensor, cb.tensor)
    assert back.metadata() == cb.metadata()
    assert back.model == "hf:gpt2" and back.config_hash == cb.config_hash != ""
    assert back.metadata()["astra_version"] == astra.__version__


@pytest.mark.parametrize("field,value", [
    ("model", "hf:bert"), ("num_layers", 3), ("dim", 64), ("groups", 2),
    ("codebook_size", 16), ("config_hash", "0123456789abcdef")])
def test_load_names_the_field_that_differs(tmp_path, field, value):
    cb = Codebooks(torch.randn(2, 4, 8, 8), model="hf:gpt2", config_hash="feedfeedfeedfeed")
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    with pytest.raises(ValueError, match=rf"{field}: codebooks in .* have .*expected '{value}'"):
        Codebooks.load(path, expect={field: value})


def test_load_against_another_model(tmp_path):
    model = _gpt2()
    cb = Codebooks.fit([torch.randn(30, 32)] * 2, groups=1, codebook_size=4, iters=1,
                       progress=False, model=model)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    with pytest.raises(ValueError, match="num_layers"):
        Codebooks.load(path, expect=_gpt2(layers=3))
    with pytest.raises(ValueError, match="dim"):
        Codebooks.load(path, expect=_gpt2(width=64))
    with pytest.raises(ValueError, match="another model.*config_hash"):
        Codebooks.load(path, expect=_gpt2(vocab=101))
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=97))
    with pytest.raises(ValueError, match="model: .* have 'hf:gpt2', expected 'hf:bert'"):
        Codebooks.load(path, expect=bert)


def test_load_rejects_a_foreign_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"codebooks": torch.zeros(1, 1, 2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an Astra codebooks file"):
        Codebooks.load(path)


def _damaged(tmp_path, kind):
    from safetensors.torch import save_file
    good = tmp_path / "good.safetensors"
    Codebooks(torch.randn(2, 1, 8, 4), model="hf:gpt2").save(good)
    path = tmp_path / f"{kind}.safetensors"
    raw = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (300,), generator=torch.Generator()
                                       .manual_seed(0)).to(torch.uint8).numpy().tobytes())
    elif kind == "directory":
        path.mkdir()
    elif kind in ("nan", "inf"):  # written past the constructor, as a damaged file would be
        meta = Codebooks(torch.randn(2, 1, 8, 4), model="hf:gpt2").metadata()
        t = torch.randn(2, 1, 8, 4)
        t[1, 0, 3, 2] = float(kind)
        save_file({"codebooks": t}, str(path), metadata=meta)
    elif kind == "stages":
        meta = Codebooks(torch.randn(2, 2, 8, 4), stage_sizes=(8, 4)).metadata()
        save_file({"codebooks": torch.randn(2, 2, 8, 4)}, str(path),
                  metadata=dict(meta, stages="8,x;8,4"))
    return path


@pytest.mark.parametrize("kind,says", [
    ("truncated", "is damaged or not a safetensors file"),
    ("empty", "is damaged or not a safetensors file"),
    ("random", "is damaged or not a safetensors file"),
    ("directory", "is a directory, not a codebooks file"),
    ("nan", r"1 non-finite values \(NaN/inf\) in layer\(s\) \[1\]"),
    ("inf", r"1 non-finite values"),
    ("stages", "bad 'stages' metadata '8,x;8,4'"),
])
def test_damaged_files_are_refused_naming_the_path(tmp_path, kind, says):
    path = _damaged(tmp_path, kind)
    with pytest.raises(ValueError, match=says) as ei:
        Codebooks.load(path)
    assert str(path) in str(ei.value)


def test_a_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="no codebooks file at /nonexistent/cb"):
        Codebooks.load("/nonexistent/cb.safetensors")


def test_non_finite_codewords_are_refused_when_made():
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in layer\(s\) \[0\]"):
        Codebooks(t)


# ------------------------------------------------------------------------- calibration

def test_collect_activations_is_the_attention_input_without_padding():
    model = _gpt2()
    ids = torch.randint(0, 97, (2, 7))
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    acts = astra.collect_activations(model, [dict(input_ids=ids, attention_mask=am)])
    assert len(acts) == 2 and [a.shape for a in acts] == [(12, 32), (12, 32)]
    with torch.no_grad():
        hs = model(ids, attention_mask=am, output_hidden_states=True).hidden_states
        x1 = model.h[1].ln_1(hs[1])  # GPT-2 is pre-LN: X = ln_1(h)
    torch.testing.assert_close(acts[1], x1[am.bool()])
    capped = astra.collect_activations(model, [ids, ids], max_tokens=9)
    assert [a.shape[0] for a in capped] == [9, 9]


def test_refined_residual_stages_are_unbiased_given_each_code():
    """After refine_stages, the tokens that chose a row of any stage (the greedy codes it
    was refined on) have a mean error of about zero: their reconstruction is their mean.
    Fitted stage by stage they do not."""
    from astra.calibrate import fit_residual
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(3000, 16, generator=g) @ torch.randn(16, 16, generator=g) + 3]
    plain = fit_residual(acts, (32, 8, 1), iters=6, progress=False, refine=0)
    refined = fit_residual(acts, (32, 8, 1), iters=6, progress=False, refine=8)
    x = acts[0]

    codes = plain.encode(0, x).long()

    def worst_bias(cb):
        err = x - cb.decode(0, codes)
        worst = 0.0
        for s, k in enumerate(cb.stages(0)):
            cnt = torch.bincount(codes[:, s], minlength=k).clamp_min(1).unsqueeze(1)
            mean = torch.zeros(k, 16).index_add_(0, codes[:, s], err) / cnt
            worst = max(worst, float(mean.norm(dim=1).max()))
        return worst
    assert worst_bias(refined) < 0.1 * worst_bias(plain), (worst_bias(refined), worst_bias(plain))
    assert float((x - refined.decode(0, codes)).pow(2).sum(-1).mean()) < plain.error(0, x)
    assert not refined.tensor[0, 1, 8:].any() and not refined.tensor[0, 2, 1:].any()
