"""The handshake before the first layer: each rank's fingerprint of what it runs, and
two torchrun ranks that disagree stopping at once with the fields named."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from astra import Codebooks, catalog
from astra.parallel import handshake
from astra.parallel.job import Job


def _fp(model, job, chunks=(8, 8)):
    return handshake.fingerprint(model, [job], [list(chunks)])


def _setup():
    prep = catalog.prepare("tiny-bert", 17, G=1, K=16)
    return prep.spec.build(), prep


def test_the_same_run_has_the_same_fingerprint_and_each_difference_is_named(monkeypatch):
    model, prep = _setup()
    job = Job("astra", prep.inputs, codebooks=prep.codebooks)
    ref = _fp(model, job)
    assert _fp(prep.spec.build(), Job("astra", prep.inputs.clone(),
                                      codebooks=prep.codebooks.clone())) == ref

    other = prep.spec.build()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    cb2 = prep.codebooks.clone()
    cb2[0, 0, 0, 0] += 1.0
    cases = {
        "weights": _fp(other, job),
        "codebooks": _fp(model, Job("astra", prep.inputs, codebooks=cb2)),
        "tokens": _fp(model, Job("astra", prep.inputs[:, :9], codebooks=prep.codebooks)),
        "chunks": _fp(model, job, chunks=(9, 7)),
        "strategy": _fp(model, Job("sp", prep.inputs)),
    }
    for field, fp in cases.items():
        diffs = handshake.compare([ref, fp])
        assert field in {k for _, k, _, _ in diffs}, (field, diffs)
        assert all(r == 1 for r, *_ in diffs)
    import astra_kernels
    monkeypatch.setattr(astra_kernels, "__version__", "0.0.0-other")
    diffs = handshake.compare([ref, _fp(model, job)])
    assert [(r, k) for r, k, _, _ in diffs] == [(1, "astra version")]
    msg = handshake.describe(diffs, 2)
    assert msg.startswith("the ranks would run different things: rank 1 of 2 differ from "
                          "rank 0 — rank 1 astra version: '0.0.0-other'")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENTRY = ["-m", "astra.cli.torchrun", "--model", "tiny-bert", "--strategy", "astra",
         "--timeout", "60"]


def _finish(procs, timeout):
    """Wait for every process; (code, stdout, stderr) each; none is left running."""
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _pair(args0, args1, timeout=240):
    """Two torchrun ranks on this machine with their own options; (code, out, err) each."""
    port = _port()
    procs = []
    for r, extra in enumerate((args0, args1)):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *ENTRY, "--repeats", "1", *extra],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return _finish(procs, timeout)


@pytest.mark.slow
def test_torchrun_ranks_that_disagree_stop_at_once_naming_the_fields(tmp_path):
    model, prep = _setup()
    x = catalog.prepare("tiny-bert", 24, with_codebooks=False).inputs
    acts = [a for a in __import__("astra").collect_activations(model, [x])]
    path = tmp_path / "other.safetensors"
    Codebooks.fit(acts, 1, 16, iters=2, progress=False, model=model, seed=5).save(path)
    # host B was given another codebooks file and another length: both fields named
    res = _pair(["--tokens", "24"], ["--tokens", "20", "--codebooks", str(path)])
    for r, (code, out, err) in enumerate(res):
        assert code == 2, (r, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rank {r}: the ranks would run "
                                                       "different things: rank 1 of 2"), err
        assert "rank 1 codebooks" in err and "rank 1 tokens: (2, 20) (rank 0: (2, 24))" in err
        assert "median" not in out
    ok = _pair(["--tokens", "24"], ["--tokens", "24"])
    assert [c for c, _, _ in ok] == [0, 0], ok[0][2] + ok[1][2]
    assert "median" in ok[0][1] and "B sent by rank 0" in ok[0][1]


@pytest.mark.slow
def test_torchrun_auto_sizes_the_chunks_to_the_measured_speeds():
    res = _pair(["--tokens", "24", "--strategy", "auto"], ["--tokens", "24", "--strategy", "auto"])
    assert [c for c, _, _ in res] == [0, 0], res[0][2] + res[1][2]
    out = res[0][1]
    line = next(ln for ln in out.splitlines() if ln.startswith("measured speeds"))
    speeds = [float(v.rstrip(",")) for v in line.split(":")[0].split()[2:]]
    chunks = [int(c) for c in line.split("chunks ")[1].split(",")]
    assert max(speeds) == 1.0 and len(speeds) == 2 and sum(chunks) == 23  # [CLS] stays
    assert "median" in out


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.startswith("astra")}


def _two_hosts(lab, extra0, extra1, tmp_path, timeout=300):
    """The README's recipe: one ``torchrun`` per namespace ("host"), rank 0's address
    as the rendezvous; (code, stdout, stderr) per host."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    procs = []
    for r, extra in enumerate((extra0, extra1)):
        cmd = lab.prefix(r) + [
            torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
            "--master_addr", lab.addr(0), "--master_port", "29511", *ENTRY,
            "--repeats", "2", *extra]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=lab.ifname(r), TMPDIR=str(tmp_path))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return _finish(procs, timeout)


@pytest.mark.slow
@pytest.mark.skipif(__import__("astra.parallel.netns", fromlist=["x"]).netns_supported()
                    is not None, reason="network namespaces need root and iproute2")
def test_the_readme_torchrun_recipe_on_two_namespaces(tmp_path):
    from astra.parallel.launcher import launch
    from astra.parallel.netns import NetnsLab
    before = _namespaces()
    with NetnsLab(2, 10.0) as lab:
        res = _two_hosts(lab, ["--tokens", "24", "--output", str(tmp_path / "out.pt")],
                         ["--tokens", "24"], tmp_path)
        assert [c for c, _, _ in res] == [0, 0], res[0][2][-2000:] + res[1][2][-2000:]
        assert "median" in res[0][1] and "codebooks sent by rank 0 once" in res[0][1]
        bad = _two_hosts(lab, ["--tokens", "24"], ["--tokens", "20"], tmp_path)
    assert _namespaces() == before  # the lab is gone
    # both hosts refused the mismatch, naming the field (torchrun reports the rank's exit)
    for code, _, err in bad:
        assert code != 0 and "rank 1 tokens: (2, 20) (rank 0: (2, 24))" in err, err[-2000:]
    # the two hosts computed what the local runner computes (equal to the simulation,
    # tests/test_runner.py) with rank 0's codebooks (the catalogue's quick fit)
    prep = catalog.prepare("tiny-bert", 24)
    local = launch(prep.spec, [Job("astra", prep.inputs, codebooks=prep.codebooks,
                                   output="compact", link=None, link_mode="none")], 2)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), local[0][0]["output"],
                               rtol=1e-5, atol=1e-5)
