"""The project's small models: seeded training, caching outside the repo, metrics.

Only tiny specs are trained here (a few steps); the real ones take minutes."""
import math

import pytest
import torch

from astra import data, zoo
from astra.cache import cache_dir

TINY_VIT = dict(hidden=16, layers=1, heads=2, mlp=16, epochs=1, batch=512)
TINY_GPT = dict(embd=16, layers=1, heads=2, ctx=32, steps=3, batch=2)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_digits_vit_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    a = zoo.digits_vit(spec=TINY_VIT, progress=False)
    files = list((tmp_path / "models").rglob("model.safetensors"))
    assert len(files) == 1
    b = zoo.digits_vit(spec=TINY_VIT, progress=False)  # cache hit: the same weights
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not b.training
    spec = dict(zoo.DIGITS_SPEC, **TINY_VIT)
    assert files[0].parent == zoo._key("digits_vit", spec)
    assert zoo._key("digits_vit", dict(spec, seed=1)) != files[0].parent  # spec in the key
    _, _, x, y = data.digits()
    acc = zoo.digits_accuracy(b, x[:50], y[:50])
    assert 0.0 <= acc <= 1.0


def test_training_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "a"))
    a = zoo.byte_gpt2(spec=TINY_GPT, progress=False)
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "b"))
    b = zoo.byte_gpt2(spec=TINY_GPT, progress=False)
    for v, v2 in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(v, v2)


def test_byte_gpt2_perplexity_is_per_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    m = zoo.byte_gpt2(spec=TINY_GPT, progress=False)
    w = zoo.heldout_bytes(ctx=32, limit=4)
    assert w.shape == (4, 32) and w.dtype == torch.int64 and int(w.max()) < 256
    ppl = zoo.perplexity(m, w)
    assert 1.0 < ppl < 2 * 256  # an untrained byte model is near uniform (256)
    with torch.no_grad():
        logits = m(input_ids=w).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_pydoc_split_is_disjoint_and_deterministic():
    for every in (2, 5):
        c, h = data.pydoc_topics("calib", every), data.pydoc_topics("heldout", every)
        assert c and h and not set(c) & set(h)
        assert set(c) | set(h) == set(data.pydoc_topics("all"))
    with pytest.raises(ValueError):
        data.pydoc_topics("train")
