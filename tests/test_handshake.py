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


def _pair(args0, args1, timeout=240):
    """Two torchrun ranks on this machine with their own options; (code, out, err) each."""
    port = _port()
    procs = []
    for r, extra in enumerate((args0, args1)):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "astra.cli.torchrun", "--model", "tiny-bert",
             "--strategy", "astra", "--repeats", "1", "--timeout", "60", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.slow
def test_torchrun_ranks_that_disagree_stop_at_once_naming_the_fields(tmp_path):
    model, prep = _setup()
    x = catalog.prepare("tiny-bert", 24, with_codebooks=False).inputs
    acts = [a for a in __import__("astra").collect_activations(model, [x])]
    path = tmp_path / "other.safetensors"
    Codebooks.fit(acts, 1, 16, iters=2, progress=False, model=model, seed=5).save(path)
    res = _pair(["--tokens", "24"], ["--tokens", "24", "--codebooks", str(path)])
    for r, (code, out, err) in enumerate(res):
        assert code == 2, (r, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rank {r}: the ranks would run "
                                                       "different things: rank 1 of 2"), err
        assert "rank 1 codebooks" in err and "median" not in out
    res = _pair(["--tokens", "24"], ["--tokens", "20"])
    for code, _, err in res:
        assert code == 2 and "rank 1 tokens: (2, 20) (rank 0: (2, 24))" in err, err
    ok = _pair(["--tokens", "24"], ["--tokens", "24"])
    assert [c for c, _, _ in ok] == [0, 0], ok[0][2] + ok[1][2]
    assert "median" in ok[0][1] and "B sent by rank 0" in ok[0][1]
