"""The command line: one parser per command, bad input as one line and exit status 2,
the torchrun entry sharing ``astra run``'s job options."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from astra import cli
from astra.bench.reliability import LONG_RUN, signal_a_run
from astra.parallel.netns import netns_supported


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


# every invalid argument of issue 15 (and a few more): refused before any work, one
# line on stderr naming the argument, exit status 2, no traceback
BAD_ARGUMENTS = [
    (["run", "--devices", "0"], "argument --devices: expected a positive integer, got '0'"),
    (["run", "--bandwidth", "0"], "argument --bandwidth: expected a positive number"),
    (["run", "--bandwidth", "-5"], "argument --bandwidth: expected a positive number"),
    (["run", "--bandwidth", "nan"], "argument --bandwidth: expected a positive number"),
    (["run", "--loss", "1.5"], "argument --loss: expected a probability"),
    (["run", "--tokens", "0"], "argument --tokens: expected a positive integer"),
    (["run", "--tokens", "-3"], "argument --tokens: expected a positive integer"),
    (["run", "--repeats", "0"], "argument --repeats: expected a positive integer"),
    (["run", "--chunks", "a,b"], "argument --chunks: expected a positive integer, got 'a'"),
    (["run", "--latency-ms", "-1"], "argument --latency-ms: expected a number >= 0"),
    (["run", "--jitter-ms", "nan"], "argument --jitter-ms: expected a number >= 0"),
    (["run", "--timeout", "0"], "argument --timeout: expected a positive number"),
    (["run", "--bandwidth-trace", "2"], "argument --bandwidth-trace: expected SECONDS:MBITS"),
    (["run", "--bandwidth-trace", "5:1,2:3"], "the times of '5:1,2:3' must not decrease"),
    (["run", "--device-speeds", "1,0"], "argument --device-speeds: expected a positive number"),
    (["run", "--devices", "3", "--device-speeds", "1,1"], "--device-speeds has 2 entries"),
    (["run", "--chunks", "5,5"], "--chunks fixes the split: give it with --strategy astra"),
    (["bench", "e2e", "--devices", "2", "--device-speeds", "1"], "--device-speeds has 1 entries"),
    (["bench", "plan", "--cells", "minilm"], "--cells: expected A:B pairs, got 'minilm'"),
    (["bench", "plan", "--links", "10:x"], "--links: expected A:B pairs, got '10:x'"),
    (["bench", "plan", "--parts", "all"], "all: expected a comma-separated subset"),
    (["run", "--devices", "3", "--chunks", "10,10"], "--chunks has 2 entries [10, 10] but "
     "there are 3 devices"),
    (["demo", "--devices", "0"], "argument --devices: expected a positive integer"),
    (["eval", "--groups", "0"], "argument --groups: expected a positive integer"),
    (["eval", "--codebook-size", "0"], "argument --codebook-size: expected a positive integer"),
    (["eval", "--devices", "-1"], "argument --devices: expected a positive integer"),
    (["eval", "--devices", "0"], "argument --devices: expected a positive integer"),
    (["finetune", "--devices", "0"], "argument --devices: expected a positive integer"),
    (["finetune", "--steps", "-1"], "argument --steps: expected a positive integer"),
    (["finetune", "--noise", "-1"], "argument --noise: expected a number >= 0"),
    (["finetune", "--groups", "0"], "argument --groups: expected a positive integer"),
    (["bench", "e2e", "--bandwidth", "0"], "argument --bandwidth: expected a positive number"),
    (["bench", "e2e", "--strategies", "foo"], "foo: expected a comma-separated subset"),
    (["bench", "e2e", "--wire", "foo"], "foo: expected a comma-separated subset"),
    (["bench", "e2e", "--decode", "-1"], "argument --decode: expected an integer >= 0"),
    (["generate", "--prompt", "hi", "--devices", "0"], "argument --devices: expected a positive"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: expected"),
    (["generate", "--prompt", "hi", "--prompt-file", "x"], "not allowed with argument"),
]


def _refusal(capsys, argv):
    """``astra argv`` in this process: (exit status, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,says", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_values_are_refused_before_any_work(capsys, argv, says):
    code, err = _refusal(capsys, argv)
    assert code == 2
    assert says in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("astra ")


@pytest.mark.parametrize("argv,says", [
    (["run", "--devices", "4", "--model", "tiny-gpt2", "--tokens", "3"],
     "3 tokens cannot be split over 4 devices"),
    (["run", "--devices", "2", "--model", "tiny-gpt2", "--tokens", "64", "--chunks", "10,10",
      "--strategy", "astra"],
     "--chunks 10,10 must be positive and sum to the 64 tokens the devices split (sum is 20)"),
    (["run", "--devices", "2", "--model", "tiny-bert", "--tokens", "9", "--chunks", "4,5",
      "--strategy", "astra"],
     "sum to the 8 tokens"),  # BERT's [CLS] is not split
    (["bench", "e2e", "--devices", "4", "--model", "tiny-gpt2", "--tokens", "2"],
     "2 tokens cannot be split over 4 devices"),
    (["finetune", "--model", "digits-vit", "--resume", "--out", "/nonexistent/ckpt"],
     "no checkpoint in /nonexistent/ckpt"),  # before the model is trained or calibrated
    (["bench", "reliability", "--models", "minilm,nope"], "unknown model 'nope'"),
])
def test_configurations_that_cannot_run_are_refused_before_any_rank_starts(
        capsys, monkeypatch, argv, says):
    from astra.parallel import launcher

    def no_launch(*a, **k):
        raise AssertionError("a rank was started")
    monkeypatch.setattr(launcher.subprocess, "Popen", no_launch)
    code, err = _refusal(capsys, argv)
    assert code == 2 and says in err, err
    assert len(err.strip().splitlines()) == 1


def test_cuda_without_a_gpu_is_refused_before_any_work(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _refusal(capsys, ["run", "--model", "tiny-gpt2", "--device", "cuda"])
    assert code == 2 and "--device cuda, but torch sees no CUDA device" in err


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


def _astra_namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.startswith("astra")}


def test_sigterm_stops_the_workers_and_removes_the_run_folder(tmp_path):
    r = signal_a_run(LONG_RUN, signal.SIGTERM, str(tmp_path))
    assert r["code"] == 128 + signal.SIGTERM
    assert r["workers"] == [] and r["folders"] == []  # no worker, the run's folder is gone


def test_workers_die_with_a_killed_parent(tmp_path):
    # SIGKILL leaves the parent no time to clean up: the kernel ends the workers
    # (parent-death signal); only the run's folder in TMPDIR remains
    r = signal_a_run(LONG_RUN, signal.SIGKILL, str(tmp_path))
    assert r["code"] == -signal.SIGKILL and r["workers"] == []


@pytest.mark.slow
@pytest.mark.skipif(netns_supported() is not None, reason=str(netns_supported()))
def test_sigterm_removes_the_namespaces_of_a_netns_run(tmp_path):
    before = _astra_namespaces()
    run = LONG_RUN[1:]  # without "run"; bench e2e takes --strategies, not --strategy
    i = run.index("--strategy")
    argv = ["bench", "e2e", "--link", "netns", "--strategies", "sp", *run[:i], *run[i + 2:]]
    r = signal_a_run(argv, signal.SIGTERM, str(tmp_path))
    assert r["code"] == 128 + signal.SIGTERM
    assert r["workers"] == [] and r["folders"] == []
    assert _astra_namespaces() == before


# ------------------------------------------------------------ parsing imports no torch

def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (nothing imported yet), its output captured."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_parsing_imports_no_torch():
    # --help and argparse's refusals come back before torch (seconds) is imported
    p = _fresh_python(
        "import sys\n"
        "import astra, astra.cli, astra.cli.torchrun\n"
        "astra.cli.build_parser(); astra.cli.torchrun.build_parser()\n"
        "print(sorted(m for m in ('torch', 'astra_kernels', 'transformers', 'numpy')\n"
        "             if m in sys.modules))\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout
    for argv in (["--help"], ["run", "--devices", "0"], ["eval", "--groups", "0"],
                 ["bench", "e2e", "--wire", "foo"]):
        p = _fresh_python(
            "import sys\nfrom astra.cli import main\n"
            f"try:\n    main({argv!r})\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
        code = "0" if argv == ["--help"] else "2"
        assert p.stdout.strip().splitlines()[-1] == f"{code} False", (argv, p.stdout, p.stderr)
        if code == "2":  # one line: prog: error: ...
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr
            assert "error: argument" in p.stderr
    # the torchrun entry too (-X importtime lists every `import` statement's module)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "astra.cli.torchrun",
                        "--tokens", "0"], capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("python -m astra.cli.torchrun: error: ")
    assert not [s for s in lines if s.startswith("import time:") and s.endswith(" torch")]
    assert [s for s in lines if s.startswith("import time:") and s.endswith(" astra.cli.run")]


def test_astra_patch_stays_the_function_after_the_submodule_is_imported():
    # importing the submodule astra.patch binds it on the package (the import system's
    # setattr); astra.patch must still be the function
    p = _fresh_python(
        "import astra.patch\n"
        "from astra.patch import unpatch\n"
        "import astra\n"
        "from astra.catalog.factories import tiny_gpt2\n"
        "model = tiny_gpt2()\n"
        "assert callable(astra.patch) and astra.patch.__module__ == 'astra.patch'\n"
        "assert astra.patch(model, None, devices=1) is model\n"
        "assert astra.is_patched(model)\n"
        "from astra import patch\n"
        "assert patch is astra.patch\n"
        "unpatch(model)\n"
        "assert not astra.is_patched(model)\n"
        "print('ok')\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"


def test_the_lazy_package_exports_its_names():
    import astra
    import astra_kernels
    assert astra.__version__ == astra_kernels.__version__
    assert astra.kernels is astra_kernels
    for name in astra.__all__:
        assert getattr(astra, name) is not None, name
        assert name in dir(astra)
    from astra.generation import AstraCache
    assert astra.AstraCache is AstraCache
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        astra.nope
