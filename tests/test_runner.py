"""The distributed runner: real processes (gloo) against the single-process references.

Each launch starts fresh worker processes (a few seconds of imports each), so one
launch runs several jobs and the tests share it through a module-scoped fixture.
"""

import pytest
import torch

import astra
from astra import catalog
from astra.catalog import factories
from astra.parallel import wire
from astra.parallel.links import LinkModel
from astra.parallel.runner import Job, ModelSpec, RunnerError, default_chunks, launch

G, K = 2, 16
BITS = 4

CASES = {
    # name: (factory, world, inputs) -- inputs: token count (chosen so chunks are
    # uneven) or an image shape
    "gpt2-N2": (factories.tiny_gpt2, 2, 23),
    "bert-N3": (factories.tiny_bert, 3, 24),   # 23 content tokens over 3 ranks: 8, 8, 7
    "gpt2-N4": (factories.tiny_gpt2, 4, 30),
    "hfvit-N3": (factories.tiny_hf_vit, 3, (1, 8, 8)),  # 2x2 patches: 16 tokens + class
    "timm-N3": (factories.tiny_vit, 3, (3, 32, 32)),    # 8x8 patches: 16 tokens + class
}


def _inputs(tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(tokens, tuple):  # images for the ViTs
        return torch.rand(2, *tokens, generator=gen)
    return torch.randint(0, 97, (2, tokens), generator=gen)


def _content_tokens(factory, tokens):
    if isinstance(tokens, tuple):
        return 16  # both ViT cases have 16 patches
    return tokens - 1 if factory is factories.tiny_bert else tokens


def _output(out):
    if isinstance(out, torch.Tensor):  # timm
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _reference(model, x, cb, world):
    with torch.no_grad():
        ref = _output(model(x))
        astra.patch(model, astra.Codebooks(cb), devices=world)
        try:
            sim = _output(model(x))
        finally:
            astra.unpatch(model)
    return ref, sim


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    factory, world, tokens = CASES[request.param]
    spec = ModelSpec(factory)
    model = spec.build()
    x = _inputs(tokens)
    with torch.no_grad():
        cb = catalog.quick_codebooks(model, x, G=G, K=K)
    ref, sim = _reference(model, x, cb, world)
    n = _content_tokens(factory, tokens)
    odd = [1] * (world - 1) + [n - world + 1]  # very uneven chunks (a slow device first)
    eq = default_chunks(n, world)  # the simulation's split (the runner's is cost-balanced)
    jobs = [Job("astra", x, codebooks=cb, chunks=eq, name="astra"), Job("sp", x, name="sp"),
            Job("tp", x, name="tp"), Job("single", x, name="single"),
            Job("sp", x, chunks=odd, name="sp-odd"), Job("tp", x, wire="int8", name="tp-int8"),
            Job("sp", x, wire="fp16", name="sp-fp16"),
            Job("astra", x, codebooks=cb, chunks=eq, name="astra-loss",
                link=LinkModel(1000.0, 0.0, loss=0.5, mtu=2, seed=3))]
    res = launch(spec, jobs, world)
    return dict(world=world, x=x, cb=cb, ref=ref, sim=sim, eq=eq,
                layers=catalog.num_layers(model),
                res=dict(zip([j.name for j in jobs], res)),
                causal=factory is factories.tiny_gpt2)


def test_astra_equals_simulate(case):
    out = case["res"]["astra"][0]["output"]
    torch.testing.assert_close(out, case["sim"], rtol=1e-5, atol=1e-5)
    # and the codes did change something (the check is not vacuous)
    assert (case["sim"] - case["ref"]).abs().max() > 1e-4


def test_packet_loss_masks_tokens_but_stays_finite(case):
    out = case["res"]["astra-loss"][0]["output"]
    assert torch.isfinite(out).all()
    assert (out - case["sim"]).abs().max() > 1e-5  # some codes were lost and masked


def test_lost_codes_are_counted_per_receiving_rank(case):
    from astra.parallel.job import summarize
    world, eq, B = case["world"], case["eq"], case["x"].shape[0]
    # each rank receives B codes per token of every rank it attends to, in every layer
    senders = [range(r) if case["causal"] else [s for s in range(world) if s != r]
               for r in range(world)]
    expect = [case["layers"] * B * sum(eq[s] for s in senders[r]) for r in range(world)]
    clean, lossy = summarize(case["res"]["astra"]), summarize(case["res"]["astra-loss"])
    assert clean["codes_received"] == expect == lossy["codes_received"]
    assert clean["codes_lost"] == [0] * world and clean["lost_fraction"] == 0.0
    assert all(0 <= lost <= got for lost, got in zip(lossy["codes_lost"], expect))
    assert 0.3 < lossy["lost_fraction"] < 0.7  # loss=0.5 per 2-byte packet, one token each
    assert summarize(case["res"]["sp"])["codes_received"] == [0] * world  # no codes sent


def test_fidelity_against_one_device():
    from astra.parallel.job import fidelity
    ref = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 0.2]])
    same = fidelity(ref.clone(), ref, logits=True)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12) and same["rel_error"] == 0.0
    assert same["top1"] == 1.0
    f = fidelity(torch.tensor([[1.0, 3.0, 2.0], [0.1, 0.5, 0.2]]), ref, logits=True)
    assert f["top1"] == 0.5 and f["cosine"] < 1.0 and f["rel_error"] > 0.1
    assert "top1" not in fidelity(ref, ref)  # embeddings: no top-1


@pytest.mark.parametrize("name", ["sp", "tp", "single", "sp-odd"])
def test_baselines_equal_single_device(case, name):
    torch.testing.assert_close(case["res"][name][0]["output"], case["ref"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,tol", [("tp-int8", 0.15), ("sp-fp16", 2e-2)])
def test_compressed_wires_are_close(case, name, tol):
    out, ref = case["res"][name][0]["output"], case["ref"]
    err = (out - ref).abs().max().item()
    assert 0 < err < tol * ref.abs().max().item()


def test_bytes_match_prediction(case):
    world, x = case["world"], case["x"]
    B = x.shape[0]
    for r, res in enumerate(case["res"]["astra"]):
        chunks = res["chunks"]
        receivers = (world - 1 - r) if case["causal"] else world - 1
        per_frame = wire.HEADER_BYTES + (B * chunks[r] * G * BITS + 7) // 8
        ex = [c for c in res["collectives"] if c["what"].startswith("exchange")]
        assert len(ex) == 2  # one per layer
        for c in ex:
            assert c["sent"] == receivers * per_frame
        # sp at fp32 sends the whole attention input: 4 bytes per element
        sp = [c for c in case["res"]["sp"][r]["collectives"] if c["what"].startswith("exchange")]
        D = 32
        assert all(c["sent"] == receivers * (wire.HEADER_BYTES + 4 * B * chunks[r] * D) for c in sp)


# ----------------------------------------------------------------------------- faults

def _fault(fault, timeout=3.0, world=2):
    spec = ModelSpec(factories.tiny_bert)
    x = _inputs(12)
    with pytest.raises(RunnerError) as ei:
        launch(spec, [Job("sp", x, fault=fault, timeout_s=timeout)], world,
               startup_timeout_s=60)
    return str(ei.value)


def test_dead_rank_fails_the_run_clearly():
    with pytest.raises(RunnerError) as ei:
        launch(ModelSpec(factories.tiny_bert), [Job("sp", _inputs(12), fault="die:1",
                                                     timeout_s=3.0)], 2, startup_timeout_s=60)
    msg = str(ei.value)
    assert msg.startswith("rank 1 dropped out (exit 3: died without an error)"), msg
    assert ei.value.lost == [1]  # a drop-out: a re-plan can do without rank 1


def test_a_rank_with_an_error_of_its_own_is_not_a_drop_out():
    # rank 1 sends a corrupted frame: rank 0 fails with a Python error naming it; that is
    # not a device dropping out (a re-plan would meet the same error), so nothing is lost
    with pytest.raises(RunnerError) as ei:
        launch(ModelSpec(factories.tiny_bert), [Job("sp", _inputs(12), fault="corrupt:1",
                                                     timeout_s=3.0)], 2, startup_timeout_s=60)
    assert ei.value.lost == []


def test_hanging_rank_times_out_clearly_and_is_the_one_blamed():
    # the job's own 3 s timeout stops the run (not the launcher's overall budget); the
    # message names the rank that stopped answering, not the ranks that waited for it
    msg = _fault("hang:1", timeout=3.0, world=3)
    first = msg.splitlines()[0]
    assert first.startswith("rank 1 stopped answering: rank"), first
    assert "waited 3 s" in first and "which rank 1 never reached" in first
    assert "did not complete within 3 s" in msg  # the waiting ranks' own reports follow


def test_unknown_fault_is_refused():
    assert "fault must be one of" in _fault("explode:1")


@pytest.mark.parametrize("fault,words", [("corrupt:1", "checksum"), ("truncate:1", "declares")])
def test_malformed_payload_is_rejected(fault, words):
    msg = _fault(fault)
    assert "PayloadError" in msg and words in msg


# ------------------------------------------------------------------ link emulation

def test_emulated_link_waits_in_wall_clock_and_virtual_clock_agrees():
    spec = ModelSpec(factories.tiny_gpt2)
    x = _inputs(20)
    lk = LinkModel(bandwidth_mbps=1.0, latency_ms=30.0)
    jobs = [Job("sp", x, link=lk, output="compact", repeats=2, chunks=[10, 10]),
            Job("sp", x, link=lk, output="compact", repeats=2, clock="virtual",
                chunks=[10, 10])]
    wall, virt = launch(spec, jobs, 2)
    # rank 1 waits for rank 0's frame of 2 layers: 30 ms + 8*(44+4*2*10*32)/1e6 s each,
    # then rank 0 waits for rank 1's summary (the gather)
    per = 0.030 + 8 * (wire.HEADER_BYTES + 4 * 2 * 10 * 32) / 1e6
    gather = 0.030 + 8 * (wire.HEADER_BYTES + 4 * 2 * 1 * 32) / 1e6
    expect = 2 * per + gather
    t_wall = min(wall[0]["times"])
    t_virt = min(virt[0]["times"])
    # the waits are never shorter than the link model says; the virtual clock (CPU time
    # on one timeline) adds only the tiny model's compute. No upper bound on wall time:
    # a loaded machine may stretch it.
    assert expect <= t_wall
    assert expect <= t_virt < expect + 0.15


_EXIT_PROBE = """
import atexit, sys
from astra.parallel.runner import _exit_now
atexit.register(lambda: print("teardown ran", flush=True))
def ok():
    return 0
def fails():
    raise ValueError("boom")
def refuses():
    raise SystemExit("rank 3: bad codebook file")
def code7():
    return 7
_exit_now({"ok": ok, "fails": fails, "refuses": refuses, "code7": code7}[sys.argv[1]])
"""


@pytest.mark.parametrize("what,rc,says", [("ok", 0, ""), ("fails", 1, "ValueError: boom"),
                                          ("refuses", 1, "rank 3: bad codebook file"),
                                          ("code7", 7, "")])
def test_worker_exit_skips_teardown_and_keeps_status(what, rc, says):
    # a finished rank leaves with os._exit: interpreter teardown (where the distributed
    # stack's static destructors sometimes abort) never runs, the status survives
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _EXIT_PROBE, what], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == rc, p.stderr
    assert "teardown ran" not in p.stdout
    assert says in p.stderr
