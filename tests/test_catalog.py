"""The catalogue: named models, their inputs and codebooks, one place for all of them."""
import pytest
import torch

from astra import catalog
from astra.cache import cache_dir, cache_path, spec_hash, write_atomic
from astra.models import resolve

TINY = ["tiny-gpt2", "tiny-bert", "tiny-hf-vit"]


@pytest.mark.parametrize("name", TINY)
def test_prepare_gives_spec_inputs_codebooks_and_layers(name):
    run = catalog.prepare(name, tokens=24, K=16)
    model = run.spec.build()
    assert run.num_layers == len(resolve(model)[1].layers(model)) == 2
    assert run.codebooks.shape[:3] == (2, 1, 16)  # [L, G, K, D/G]
    assert run.codebooks.shape[3] == resolve(model)[1].dim(model)
    with torch.no_grad():  # the inputs fit the model
        model(run.inputs)
    # the same name gives the same inputs (every rank builds its own)
    torch.testing.assert_close(catalog.prepare(name, tokens=24, K=16).inputs, run.inputs)


def test_every_row_names_itself_and_unknown_names_fail():
    assert catalog.names() == list(catalog.CATALOG)
    assert all(catalog.get(n).name == n for n in catalog.names())
    with pytest.raises(ValueError, match="unknown model 'resnet'.*tiny-gpt2"):
        catalog.get("resnet")


def test_the_parsers_names_are_the_rows():
    # astra.options declares the names for `astra run --help` without torch: the same rows
    from astra import options
    assert list(options.MODEL_NAMES) == catalog.names()


def test_positions_and_lengths_are_checked():
    with pytest.raises(ValueError, match="tiny-gpt2 has 128 positions"):
        catalog.model_and_inputs("tiny-gpt2", 129)
    with pytest.raises(ValueError, match="must be positive"):
        catalog.model_and_inputs("tiny-bert", 0)
    _, x = catalog.model_and_inputs("tiny-gpt2", 128)
    assert x.shape == (2, 128)


def test_quick_codebooks_with_fewer_rows_than_codewords():
    model = catalog.factories.tiny_gpt2()
    x = torch.randint(0, 97, (1, 5))
    cb = catalog.quick_codebooks(model, x, G=2, K=64)
    assert cb.shape == (2, 2, 64, 16) and torch.isfinite(cb).all()


def test_cache_paths_are_keyed_by_what_made_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    a = cache_path("codebooks", "m", {"K": 1}, suffix=".st")
    assert a.parent == tmp_path / "codebooks" and a.name.endswith(".st")
    assert a != cache_path("codebooks", "m", {"K": 2}, suffix=".st")
    assert spec_hash({"a": 1, "b": 2}) == spec_hash({"b": 2, "a": 1})
    p = tmp_path / "x" / "f.bin"
    write_atomic(p, lambda tmp: open(tmp, "wb").write(b"ok"))
    assert p.read_bytes() == b"ok" and list(p.parent.iterdir()) == [p]
    with pytest.raises(RuntimeError):
        write_atomic(p, lambda tmp: (open(tmp, "wb").write(b"half"), _boom()))
    assert p.read_bytes() == b"ok" and list(p.parent.iterdir()) == [p]  # nothing half-written


def _boom():
    raise RuntimeError("crash while writing")


def test_strategies_without_codes_skip_the_codebooks():
    run = catalog.prepare("tiny-bert", tokens=24, with_codebooks=False)
    assert run.codebooks is None and run.num_layers == 2
    assert catalog.load("tiny-bert", 24, with_codebooks=False).codebooks is None
