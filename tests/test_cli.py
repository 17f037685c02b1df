"""The command line: one parser per command, bad input as one line and exit status 2,
the torchrun entry sharing ``astra run``'s job options."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astra import cli


def _main(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


def test_every_command_registers():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)


@pytest.mark.parametrize("argv,says", [
    (["run", "--model", "resnet"], "astra run: unknown model 'resnet'"),
    (["run", "--model", "tiny-gpt2"], "astra run: tiny-gpt2 has 128 positions"),
    (["bench", "e2e", "--model", "resnet"], "astra bench e2e: unknown model 'resnet'"),
    (["bench", "kernels", "--cases", "nope"], "astra bench kernels: unknown case(s) ['nope']"),
])
def test_library_errors_become_one_line(capsys, argv, says):
    code, out = _main(capsys, *argv)
    assert code == 2
    assert out.err.strip().splitlines() == [out.err.strip()]  # one line, no traceback
    assert out.err.startswith(says), out.err


@pytest.mark.parametrize("argv,says", [
    (["run", "--devices", "0"], "expected a positive integer, got '0'"),
    (["run", "--bandwidth", "nan"], "expected a positive number"),
    (["run", "--loss", "1.5"], "expected a probability"),
    (["run", "--chunks", "a,b"], "expected a positive integer, got 'a'"),
    (["bench", "e2e", "--strategies", "foo"], "foo: expected a comma-separated subset"),
    (["demo", "--devices", "-1"], "expected a positive integer"),
])
def test_bad_values_are_refused_before_any_work(capsys, argv, says):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert says in capsys.readouterr().err


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("ASTRA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model"):
        cli.main(["run", "--model", "resnet"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_entry_runs_a_rank_with_the_run_options():
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    p = subprocess.run([sys.executable, "-m", "astra.cli.torchrun", "--model", "tiny-bert",
                        "--tokens", "16", "--strategy", "single", "--repeats", "1"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert "B sent by rank 0" in p.stdout and "median" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "astra.cli.torchrun", "--model", "resnet"],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "rank 0: unknown model 'resnet'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_old_torchrun_entry_points_to_the_new_one():
    p = subprocess.run([sys.executable, "-m", "astra.parallel.runner", "torchrun"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode != 0 and "python -m astra.cli.torchrun" in p.stderr


def _processes_mentioning(text: str):
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(int(d.name))
    return found


def test_sigterm_stops_the_workers_and_removes_the_run_folder(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "astra.cli", "run", "--model", "tiny-bert",
                          "--tokens", "32", "--devices", "2", "--strategy", "sp",
                          "--repeats", "100000", "--bandwidth", "1000", "--latency-ms", "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers, deadline = [], time.monotonic() + 180
        while len(workers) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.5)
            workers = _processes_mentioning(str(tmp_path / "astra-run-"))
        assert len(workers) == 2, p.stderr.read() if p.poll() is not None else "no workers"
        time.sleep(2)  # the ranks are inside their jobs
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path / "astra-run-")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path / "astra-run-")) == []  # no worker left
    assert list(tmp_path.glob("astra-run-*")) == []  # the run's folder is gone
