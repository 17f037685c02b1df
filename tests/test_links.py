"""Wire format, link model, loss and the real (netns) link."""
import math
import subprocess

import pytest
import torch

from astra.parallel import wire
from astra.parallel.comm import DistCommunicator, VirtualClock
from astra.parallel.links import LinkModel, all_gather_plan
from astra.parallel.netns import netns_supported


@pytest.mark.parametrize("G,K", [(1, 1024), (4, 16), (32, 1024), (3, 7)])
def test_code_frame_size_is_G_log2K_bits_per_token_plus_header(G, K):
    bits = max(1, (K - 1).bit_length())
    codes = torch.randint(0, K, (2, 37, G), dtype=torch.int32)
    f = wire.encode(codes, "codes", seq=5, src=1, t_send=1.5, bits=bits)
    assert f.numel() == wire.HEADER_BYTES + math.ceil(2 * 37 * G * bits / 8)
    fr = wire.decode(f, kind="codes", seq=5, src=1, rows=2, tokens=37, width=G, bits=bits)
    assert fr.t_send == 1.5
    assert torch.equal(wire.decode_tensor(fr), codes)


@pytest.mark.parametrize("kind,tol", [("fp32", 0), ("fp16", 1e-3), ("int8", 1e-2)])
def test_float_frames_roundtrip(kind, tol):
    x = torch.randn(2, 5, 48)
    f = wire.encode(x, kind, seq=0, src=0, t_send=0.0)
    assert f.numel() == wire.frame_nbytes(kind, 2, 5, 48)
    y = wire.decode_tensor(wire.decode(f, kind=kind, seq=0, src=0, rows=2, tokens=5, width=48))
    assert (y - x).abs().max() <= tol * x.abs().max()


def _frame():
    codes = torch.randint(0, 16, (1, 9, 2), dtype=torch.int32)
    return wire.encode(codes, "codes", seq=3, src=2, t_send=0.0, bits=4)


EXPECT = dict(kind="codes", seq=3, src=2, rows=1, tokens=9, width=2, bits=4)


@pytest.mark.parametrize("mutate,words", [
    (lambda f: f.__setitem__(0, ord("X")), "bad magic"),
    (lambda f: f.__setitem__(-1, int(f[-1]) ^ 1), "checksum"),
    (lambda f: f.__setitem__(8, 4), "seq=4"),
    (lambda f: f.__setitem__(20, 8), "tokens=8"),
])
def test_malformed_frames_are_rejected(mutate, words):
    f = _frame().clone()
    mutate(f)
    with pytest.raises(wire.PayloadError, match=words):
        wire.decode(f, **EXPECT)


def test_truncated_frames_are_rejected():
    f = _frame()
    with pytest.raises(wire.PayloadError, match="truncated"):
        wire.decode(f[:-2], **EXPECT)
    with pytest.raises(wire.PayloadError, match="shorter than"):
        wire.decode(f[:10], **EXPECT)
    with pytest.raises(wire.PayloadError, match="expected"):
        wire.decode(f, **dict(EXPECT, src=1))


def test_link_model_shared_vs_switched():
    plan = all_gather_plan([1000, 1000, 1000])
    shared = LinkModel(8.0, 2.0, medium="shared")
    switched = LinkModel(8.0, 2.0, medium="switched")
    assert shared.duration_s(plan) == pytest.approx(2e-3 + 6 * 1000 * 8 / 8e6)
    assert switched.duration_s(plan) == pytest.approx(2e-3 + 2 * 1000 * 8 / 8e6)


def test_loss_marks_tokens_missing_and_is_deterministic():
    lk = LinkModel(10.0, loss=0.5, mtu=4, seed=1)
    comm = DistCommunicator(1, 2, [40, 40], bits=4, link=lk)
    codes = torch.randint(0, 16, (1, 40, 2), dtype=torch.int32)
    f = wire.decode(wire.encode(codes, "codes", seq=7, src=0, t_send=0, bits=4),
                    kind="codes", seq=7, src=0, rows=1, tokens=40, width=2, bits=4)
    a, rounds, resent = comm._drop(codes, 7, 0, f)
    b, _, _ = comm._drop(codes, 7, 0, f)
    assert torch.equal(a, b) and rounds == 0 and resent == 0
    miss = (a < 0).all(-1)
    assert 0 < int(miss.sum()) < 40
    assert ((a < 0).any(-1) == miss).all()         # a token is lost whole
    # 4-byte packets of 8-bit tokens: lost tokens come in runs of 4
    assert int(miss.sum()) % 4 == 0
    assert torch.equal(a[~miss.unsqueeze(-1).expand_as(a)], codes[~miss.unsqueeze(-1).expand_as(a)])


def test_resend_rounds_recover_lost_packets_and_count_what_was_resent():
    codes = torch.randint(0, 16, (1, 400, 2), dtype=torch.int32)
    f = wire.decode(wire.encode(codes, "codes", seq=7, src=0, t_send=0, bits=4),
                    kind="codes", seq=7, src=0, rows=1, tokens=400, width=2, bits=4)
    lost = {}
    for resend in (0, 1, 2):
        lk = LinkModel(10.0, loss=0.5, mtu=4, seed=1, resend=resend)
        out, rounds, resent = DistCommunicator(1, 2, [400, 400], bits=4, link=lk)._drop(
            codes, 7, 0, f)
        lost[resend] = int((out < 0).all(-1).sum())
        assert rounds == resend and (resent > 0) == (resend > 0)
        assert resent % 4 == 0  # whole 4-byte packets
        assert torch.equal(out[out >= 0], codes[out >= 0])  # what arrived is intact
    # each round keeps about half of what was still lost (loss 0.5)
    assert 120 < lost[0] < 280 and 40 < lost[1] < 140 and lost[2] < lost[1]
    with pytest.raises(ValueError, match="resend must be an int >= 0"):
        LinkModel(10.0, resend=-1)


def test_virtual_clock_advances_on_waits_only_forward():
    c = VirtualClock()
    t = c.now()
    assert c.wait_until(t + 5.0) > 4.9
    assert c.now() >= t + 5.0
    assert c.wait_until(0.0) == 0.0


# --------------------------------------------------------------------------- netns

def _astra_namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith("astra")]


@pytest.mark.slow
@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_netns_link_runs_and_cleans_up():
    from astra.catalog import factories
    from astra.parallel.netns import NetnsLab
    from astra.parallel.runner import Job, ModelSpec, launch
    before = set(_astra_namespaces())
    x = torch.randint(0, 97, (2, 20))
    spec = ModelSpec(factories.tiny_gpt2)
    ref = spec.build()(x).logits
    lk = LinkModel(10.0, latency_ms=1.0)
    with NetnsLab(2, 10.0) as lab:
        res = launch(spec, [Job("sp", x, link=lk, link_mode="latency")], 2, netns=lab)
        assert lab.ns(0) in _astra_namespaces()
    torch.testing.assert_close(res[0][0]["output"], ref.detach(), rtol=1e-4, atol=1e-4)
    assert set(_astra_namespaces()) == before
    # and cleanup also happens when the body fails
    with pytest.raises(ZeroDivisionError):
        with NetnsLab(2, 10.0) as lab:
            assert lab.ns(1) in _astra_namespaces()
            1 / 0
    assert set(_astra_namespaces()) == before


@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_a_dead_runs_namespaces_are_removed_and_a_live_ones_kept(tmp_path):
    import os

    from astra.parallel import netns
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(netns.OWNERS, exist_ok=True)
    made = {"astra218-hub": os.getpid(), "astra219-hub": dead.pid, "astra219-r0": dead.pid}
    for ns, pid in made.items():
        subprocess.run(["ip", "netns", "add", ns], check=True)
        with open(os.path.join(netns.OWNERS, ns.split("-")[0] + ".pid"), "w") as f:
            f.write(str(pid))
    try:
        with pytest.warns(UserWarning, match="died without cleaning up: astra219"):
            with netns.NetnsLab(1, 10.0) as lab:
                assert lab.lab_id not in (218, 219)  # a fresh id, not a live lab's
                live = _astra_namespaces()
        assert "astra219-hub" not in live and "astra219-r0" not in live
        assert "astra218-hub" in _astra_namespaces()  # its owner (this test) is alive
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for tag in ("astra218", "astra219"):
            try:
                os.remove(os.path.join(netns.OWNERS, tag + ".pid"))
            except OSError:
                pass


def test_e2e_table_flags_a_speedup_above_its_bound(capsys):
    from astra.bench.e2e import bound, print_table
    t1 = 0.2
    b = bound(4, 6, 0.5e-3, t1)
    row = dict(model="m", strategy="astra", wire="-", devices=4, bandwidth_mbps=10,
               latency_ms=50.0, bytes_per_device=100)
    print_table([dict(row, speedup=3.0, bound=b)])
    assert "above their bound" not in capsys.readouterr().out
    print_table([dict(row, speedup=b * 1.1, bound=b)])
    assert "1 speedup(s) above their bound" in capsys.readouterr().out
