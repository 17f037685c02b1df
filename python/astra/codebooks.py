"""Per-layer VQ codebooks (grouped or residual): fitting, files, calibration inputs.

A :class:`Codebooks` holds one tensor, of one of two kinds (:attr:`Codebooks.kind`):

- ``"grouped"`` ``[L, G, K, D/G]``: for layer l, group g (dims ``g*D/G ... (g+1)*D/G - 1``
  of the attention input X), K codewords. A token of layer l is sent as G codes of
  ``ceil(log2 K)`` bits.
- ``"residual"`` ``[L, S, Kmax, D]``: S full-width stages; stage s (its first
  ``stages(l)[s]`` rows) quantizes what the stages before it left, ``X̂`` is the sum of
  the S chosen rows. A token is S codes, ``sum_s ceil(log2 K_s)`` bits.

What the codewords quantize is the codebooks' :attr:`Codebooks.target`:

- ``"x"``: the attention input X (width D, the model's hidden size). The projected
  tables ``pk, pv [G, K, Hkv, d]`` (codebook group g through the matching rows of
  W_k / W_v, bias folded into group 0) depend on the model's weights; they are derived
  by :class:`astra.AstraAttention` when the model is patched, never stored here.
- ``"kv"``: the token's key before RoPE and its value, ``[k; v]`` (width
  ``2·Hkv·d``: 384 for SmolLM2's 3 KV heads of 64 against X's 576). A codeword *is*
  a key and a value: the tables are its two halves, no projection. With GQA the
  vector is narrower than X, and the codes are chosen by the error of what attention
  uses (measured: +9.1% perplexity against X's +11.1% at 10 bits, SmolLM2, N=4).

Files are safetensors with string metadata: format, Astra version, model identity
(family, name, config hash), num_layers, dim (D), groups (G), codebook_size (K),
stages, target (files without it are ``"x"``).
:meth:`Codebooks.load` checks them against a model (or a dict) and raises a
``ValueError`` that names each field that differs.
"""
from __future__ import annotations

import math
import os
from contextlib import ExitStack
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import astra_kernels

from .kmeans import INITS, kmeans
from .options import QUANTIZE_TARGETS

__all__ = ["Codebooks", "collect_activations", "kv_activations", "TARGETS"]

TARGETS = QUANTIZE_TARGETS  # what the codewords quantize (see the module docstring)

FORMAT = "astra-codebooks/1"
_INT_FIELDS = ("num_layers", "dim", "groups", "codebook_size")
# Checked in this order; the first mismatches are the most telling.
_CHECK_ORDER = ("model", "num_layers", "target", "dim", "groups", "codebook_size",
                "config_hash")


def _astra_version() -> str:
    return astra_kernels.__version__  # astra.__version__ is the kernels' version


class Codebooks:
    """Codebooks of every layer: one float32 tensor plus identity metadata.

    Args:
        tensor: grouped ``[L, G, K, D/G]``, or residual ``[L, S, Kmax, D]`` with
            ``stage_sizes`` (see the module docstring).
        model: the model family the codebooks were fitted on (``"hf:bert"`` ...), as
            given by :func:`astra.models.resolve`; ``""`` if unknown.
        name: the model's name (informational, not checked).
        config_hash: architecture hash of the model (see :mod:`astra.models`).
        stage_sizes: residual codebooks: the S stage sizes, one tuple for all layers or
            one per layer (None: grouped). A stage of size 1 costs no bits.
        target: what the codewords quantize: ``"x"`` (the attention input, width D) or
            ``"kv"`` (the pre-RoPE key and the value, width ``2·Hkv·d``).
    """

    def __init__(self, tensor: Tensor, *, model: str = "", name: str = "",
                 config_hash: str = "",
                 stage_sizes: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                 target: str = "x"):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor)
            raise ValueError(f"codebooks tensor must be [L, G, K, D/G], got {got}")
        if min(tensor.shape) < 1:
            raise ValueError(f"codebooks tensor has an empty dimension: {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"codebooks tensor must be float, got {tensor.dtype}")
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            layers = sorted({int(i) for i in (~finite).nonzero()[:, 0].tolist()})
            more = " ..." if len(layers) > 8 else ""
            raise ValueError(f"codebooks tensor has {int((~finite).sum())} non-finite values "
                             f"(NaN/inf) in layer(s) {layers[:8]}{more}")
        self.tensor = tensor.detach().float().contiguous()
        # Residual: stage s uses its first stage_sizes[s] rows (the rest is padding); a
        # stage of size 1 costs no bits (its one codeword is a fixed offset).
        self._stages: Optional[List[Tuple[int, ...]]] = None
        self.stage_sizes: Union[Tuple[int, ...], Tuple[Tuple[int, ...], ...], None] = None
        if stage_sizes is not None:
            per_layer = len(stage_sizes) > 0 and not isinstance(stage_sizes[0], (int,))
            if per_layer and hasattr(stage_sizes[0], "__len__"):
                rows = [tuple(int(k) for k in r) for r in stage_sizes]
            else:
                rows = [tuple(int(k) for k in stage_sizes)] * tensor.shape[0]
            bad = len(rows) != tensor.shape[0] or any(
                len(r) != tensor.shape[1] or not all(1 <= k <= tensor.shape[2] for k in r)
                for r in rows)
            if bad:
                raise ValueError(f"stage_sizes {stage_sizes} do not fit a residual codebooks "
                                 f"tensor [L, S, K, D] of shape {tuple(tensor.shape)}")
            self._stages = rows
            self.stage_sizes = rows[0] if all(r == rows[0] for r in rows) else tuple(rows)
        self.model, self.name, self.config_hash = str(model), str(name), str(config_hash)
        self.target = target
        self.history: List[List[float]] = []   # fit(): mean squared error per iteration
        self.reseeded: List[int] = []          # fit(): empty clusters re-seeded per layer

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    @property
    def kind(self) -> str:
        """``"grouped"`` (G groups of D/G dims) or ``"residual"`` (S full-width stages)."""
        return "grouped" if self._stages is None else "residual"

    @property
    def num_stages(self) -> Optional[int]:
        """S, the stages of residual codebooks; None for grouped codebooks."""
        return None if self._stages is None else self.tensor.shape[1]

    @property
    def groups(self) -> int:
        """G of grouped codebooks. The tensor's second axis, so for residual codebooks it
        is the number of stages S (the file field ``groups`` and older callers read it
        so); new code should use :attr:`num_stages` or :attr:`codes_per_token`."""
        return self.tensor.shape[1]

    @property
    def codes_per_token(self) -> int:
        """Codes one token is sent as per layer: G (grouped) or S (residual)."""
        return self.tensor.shape[1]

    @property
    def codebook_size(self) -> int:
        return self.tensor.shape[2]

    @property
    def dim(self) -> int:
        if self.kind == "residual":
            return self.tensor.shape[3]
        return self.groups * self.tensor.shape[3]

    def stages(self, layer: int) -> Optional[Tuple[int, ...]]:
        """Layer ``layer``'s residual stage sizes, None for grouped codebooks."""
        return None if self._stages is None else self._stages[layer]

    def layer_bits(self, layer: int) -> int:
        """Bits one token costs on the wire in layer ``layer``."""
        st = self.stages(layer)
        if st is not None:  # each stage packed at its own width; size 1: no bits
            return sum(math.ceil(math.log2(k)) for k in st)
        return self.groups * max(1, math.ceil(math.log2(self.codebook_size)))

    @property
    def bits_per_token(self) -> Union[int, float]:
        """Bits one token costs on the wire per layer: ``G * ceil(log2 K)``; residual
        codebooks: ``sum_s ceil(log2 K_s)``; the mean over layers when they differ."""
        bits = [self.layer_bits(i) for i in range(self.num_layers)]
        mean = sum(bits) / len(bits)
        return int(mean) if mean == int(mean) else mean

    def __len__(self) -> int:
        return self.num_layers

    def layer(self, i: int) -> Tensor:
        """Layer ``i``'s codebooks ``[G, K, D/G]``."""
        return self.tensor[i]

    def __repr__(self) -> str:
        st = "" if self.stage_sizes is None else f", stages={self.stage_sizes}"
        st += "" if self.target == "x" else f", target={self.target!r}"
        return (f"Codebooks(layers={self.num_layers}, D={self.dim}, G={self.codes_per_token}, "
                f"K={self.codebook_size}{st}, model={self.model!r}, name={self.name!r})")

    def to(self, device) -> "Codebooks":
        return self.with_tensor(self.tensor.to(device))

    def with_tensor(self, tensor: Tensor) -> "Codebooks":
        """Codebooks with this one's identity, stage sizes, target and fitting record
        (``history``, ``reseeded``) and a new ``tensor`` of the same layout (e.g. after
        training); residual padding rows are set to zero."""
        out = Codebooks(tensor, model=self.model, name=self.name,
                        config_hash=self.config_hash, stage_sizes=self._stages,
                        target=self.target)
        for li in range(out.num_layers):
            out.zero_padding(li, out.tensor[li])
        out.history, out.reseeded = self.history, self.reseeded  # k-means's record
        return out

    def zero_padding(self, layer: int, t: Tensor) -> Tensor:
        """Zero, in place, the rows of layer ``layer``'s tensor ``t [S, Kmax, D]`` past each
        residual stage's size (no-op for grouped codebooks); returns ``t``."""
        for s, k in enumerate(self.stages(layer) or ()):
            t[s, k:] = 0
        return t

    # ------------------------------------------------------------- use
    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Codes ``int32 [..., G]`` (residual: ``[..., S]``) of ``x [..., D]`` in layer
        ``layer``'s codebooks."""
        cb = self.tensor[layer].to(x.device)
        if self.kind == "grouped":
            return astra_kernels.vq_encode(x, cb)
        r, codes = x.float(), []
        for s, k in enumerate(self.stages(layer)):
            c = astra_kernels.vq_encode(r, cb[s:s + 1, :k])
            r = r - cb[s, c[..., 0].long()]
            codes.append(c)
        return torch.cat(codes, dim=-1)

    def decode(self, layer: int, codes: Tensor) -> Tensor:
        """``X̂ [..., D]`` from codes ``[..., G]`` (residual: the sum of the S rows)."""
        cb = self.tensor[layer].to(codes.device)
        G = cb.shape[0]
        xq = cb[torch.arange(G, device=cb.device), codes.long()]
        if self.kind == "residual":
            return xq.sum(-2)
        return xq.reshape(*codes.shape[:-1], self.dim)

    def error(self, layer: int, x: Tensor) -> float:
        """Mean squared quantization error (summed over D) of ``x [..., D]``."""
        x = x.reshape(-1, x.shape[-1]).float()
        if self.kind == "residual":
            err = ((x - self.decode(layer, self.encode(layer, x))) ** 2).sum(-1)
            return float(err.double().mean())
        _, err = astra_kernels.vq_encode(x, self.tensor[layer].to(x.device), return_error=True)
        return float(err.double().mean())

    # ------------------------------------------------------------- metadata
    def metadata(self) -> Dict[str, str]:
        return {"format": FORMAT, "astra_version": _astra_version(), "model": self.model,
                "name": self.name, "config_hash": self.config_hash,
                "num_layers": str(self.num_layers), "dim": str(self.dim),
                "groups": str(self.groups), "codebook_size": str(self.codebook_size),
                "stages": ";".join(",".join(map(str, r)) for r in (self._stages or ())),
                "target": self.target}

    def check(self, expect: Union[nn.Module, Mapping[str, Any], None],
              source: str = "codebooks") -> None:
        """Raise ``ValueError`` naming every field that differs from ``expect``.

        ``expect``: a model (its identity: model, config_hash, num_layers, dim, kv_dim)
        or a mapping with any of ``model, config_hash, num_layers, dim, kv_dim, target,
        groups, codebook_size``. Empty strings on either side are not compared. The
        width compared is ``dim`` for ``"x"`` codebooks and ``kv_dim`` (``2·Hkv·d``)
        for ``"kv"`` ones.
        """
        if expect is None:
            return
        if isinstance(expect, nn.Module):
            from .models import resolve
            expect = resolve(expect)[1].identity(expect)
        unknown = set(expect) - set(_CHECK_ORDER) - {"name", "kv_dim"}
        if unknown:
            raise ValueError(f"unknown fields in expect: {sorted(unknown)}")
        have = self.metadata()
        if self.target == "kv":  # the width of [k; v], not of X
            expect = {k: v for k, v in expect.items() if k != "dim"}
            if expect.get("kv_dim") is not None:
                expect["dim"] = expect["kv_dim"]
        diffs = []
        for f in _CHECK_ORDER:
            if f not in expect or expect[f] is None:
                continue
            want, got = str(expect[f]), have[f]
            if f in ("model", "config_hash") and (not want or not got):
                continue
            if want != got:
                msg = f"{f}: {source} have {got!r}, expected {want!r}"
                if f == "dim" and self.target == "kv":
                    msg += " (the width of [key; value], 2 x KV heads x head dim)"
                if (f == "dim" and self.kind == "grouped" and want.isdigit()
                        and int(want) % self.groups):
                    msg += f" (G={self.groups} groups do not divide the width D={want})"
                diffs.append(msg)
        if diffs:
            hint = ""
            if any(d.startswith(("model", "config_hash")) for d in diffs):
                hint = (" (the codebooks were fitted on another model"
                        + (f": {self.name!r}" if self.name else "") + ")")
            raise ValueError(f"{source} do not match the model{hint}: " + "; ".join(diffs))

    # ------------------------------------------------------------- files
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file (tensor ``codebooks`` + metadata)."""
        from safetensors.torch import save_file
        save_file({"codebooks": self.tensor.cpu().contiguous()}, os.fspath(path),
                  metadata=self.metadata())

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             expect: Union[nn.Module, Mapping[str, Any], None] = None,
             device="cpu") -> "Codebooks":
        """Read a file written by :meth:`save`; check it against ``expect`` (see
        :meth:`check`). Raises ``FileNotFoundError`` for a missing path and ``ValueError``
        (naming the path) for a directory, a damaged, foreign or inconsistent file, or
        non-finite codewords."""
        from safetensors import SafetensorError, safe_open
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a codebooks file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no codebooks file at {path}")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not an Astra codebooks file (format="
                                     f"{meta.get('format')!r}, expected {FORMAT!r})")
                if "codebooks" not in f.keys():
                    raise ValueError(f"{path} has no 'codebooks' tensor")
                tensor = f.get_tensor("codebooks")
        except (SafetensorError, OSError) as e:
            # truncated, empty or random bytes: safetensors' message names no file
            raise ValueError(f"{path} is damaged or not a safetensors file ({e})") from None
        stages = meta.get("stages", "")
        try:
            stage_sizes = ([[int(k) for k in r.split(",")] for r in stages.split(";")]
                           if stages else None)
        except ValueError:
            raise ValueError(f"{path} is damaged: bad 'stages' metadata {stages!r} "
                             "(expected e.g. '1024,256;1024,256')") from None
        try:
            out = cls(tensor, model=meta.get("model", ""), name=meta.get("name", ""),
                      config_hash=meta.get("config_hash", ""), stage_sizes=stage_sizes,
                      target=meta.get("target", "x"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        have = out.metadata()
        for k in _INT_FIELDS:
            if meta.get(k) != have[k]:
                raise ValueError(f"{path} is inconsistent: metadata {k}={meta.get(k)} but the "
                                 f"tensor {tuple(tensor.shape)} gives {have[k]}")
        out.check(expect, source=f"codebooks in {path}")
        return out

    # ------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, activations_per_layer: Sequence[Tensor], groups: int, codebook_size: int,
            iters: int = 20, seed: int = 0, progress: bool = True, *,
            init: str = "k-means++", model: Optional[nn.Module] = None,
            max_points: Optional[int] = None, target: str = "x") -> "Codebooks":
        """k-means per layer and group (Lloyd iterations, squared L2).

        Args:
            activations_per_layer: one ``[..., D]`` tensor per layer (the attention
                input X of that layer, e.g. from :func:`collect_activations`).
            groups: G; must divide D.
            codebook_size: K.
            iters: at most this many Lloyd iterations (stops early when no code changes).
            seed: everything random (init, sub-sampling) comes from this seed: equal
                inputs and seed give equal codebooks.
            progress: show a tqdm bar.
            init: ``"k-means++"`` (D²-sampling, on at most ``max(8K, 4096)`` points),
                ``"sampled"`` (D²-sampling in 32 rounds of K/32 picks each: k-means++'s
                spread at a fraction of its time, which is sequential over K) or
                ``"random"`` (K distinct points sampled uniformly).
            model: take the identity metadata (family, name, config hash) from it.
            max_points: fit on a random subset of at most this many points per layer.
            target: what the activations are (``"x"``, or ``"kv"`` from
                :func:`kv_activations`); checked against ``model``'s widths.

        The assignment step is :func:`astra_kernels.vq_encode` (all groups at once).
        A cluster that ends an iteration empty is re-seeded with the point that has
        the largest error in that group (distinct points for several empty clusters).
        With fewer distinct points than K, the surplus codewords are duplicates.
        ``history[l]`` holds the mean error per token after init and after each
        iteration; ``reseeded[l]`` the number of re-seeded clusters.
        """
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) \
                or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if len(activations_per_layer) == 0:
            raise ValueError("activations_per_layer is empty")
        dims = {int(a.shape[-1]) for a in activations_per_layer}
        if len(dims) != 1:
            raise ValueError(f"all layers must have one width D, got {sorted(dims)}")
        D = dims.pop()
        if D % groups:
            raise ValueError(f"G={groups} groups do not divide the width D={D}")
        ident: Dict[str, str] = {}
        if model is not None:
            from .models import resolve
            idn = resolve(model)[1].identity(model)
            ident = {"model": idn["model"], "name": idn["name"],
                     "config_hash": idn["config_hash"]}
            width = idn["kv_dim"] if target == "kv" else idn["dim"]
            if width != D or idn["num_layers"] != len(activations_per_layer):
                raise ValueError(
                    f"activations ({len(activations_per_layer)} layers, D={D}) do not match "
                    f"the model ({idn['num_layers']} layers, {target} width {width})")
        gen = torch.Generator().manual_seed(int(seed))
        L = len(activations_per_layer)
        out, hist, reseeded = [], [], []
        from tqdm.auto import tqdm
        with tqdm(total=L * (iters + 1), desc="k-means", unit="it",
                  disable=not progress) as bar:
            for li, acts in enumerate(activations_per_layer):
                x = acts.detach().reshape(-1, D).float()
                if x.shape[0] == 0:
                    raise ValueError(f"layer {li} has no activations")
                if max_points is not None and x.shape[0] > max_points:
                    x = x[torch.randperm(x.shape[0], generator=gen)[:max_points].to(x.device)]
                bar.set_postfix(layer=li)
                C, h, r = kmeans(x, groups, codebook_size, iters, gen, init, bar)
                out.append(C)
                hist.append(h)
                reseeded.append(r)
        cb = cls(torch.stack(out).cpu(), target=target, **ident)
        cb.history, cb.reseeded = hist, reseeded
        return cb


# ---------------------------------------------------------------------- calibration

@torch.no_grad()
def collect_activations(model: nn.Module, batches: Iterable[Any], *,
                        max_tokens: Optional[int] = None, device=None) -> List[Tensor]:
    """The attention input X of every layer, gathered by forward pre-hooks.

    Args:
        model: a supported model (patched or not; with ``devices=1`` and
            ``distributed_cls=False`` a patched model sees what the original sees).
        batches: iterable of model inputs: a dict (``model(**batch)``; its
            ``attention_mask``, if any, drops padding tokens), a tuple (``model(*b)``)
            or a tensor (``model(b)``).
        max_tokens: stop collecting a layer after this many tokens.
        device: move each batch's tensors here first (default: leave them).

    Returns:
        ``[M_l, D]`` float32 CPU tensors, one per layer.
    """
    from .models import resolve
    _, adapter = resolve(model)
    slots = adapter.attention_slots(model)
    store: List[List[Tensor]] = [[] for _ in slots]
    counts = [0] * len(slots)
    keep: Dict[str, Optional[Tensor]] = {"mask": None}

    def make_hook(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if max_tokens is not None and counts[i] >= max_tokens:
                return
            m = keep["mask"]
            if m is not None and m.shape == x.shape[:2]:
                rows = x[m.to(x.device).bool()]
            else:
                rows = x.reshape(-1, x.shape[-1])
            if max_tokens is not None:
                rows = rows[: max_tokens - counts[i]]
            counts[i] += rows.shape[0]
            store[i].append(rows.detach().float().cpu())
        return hook

    with ExitStack() as stack:
        for i, (parent, name) in enumerate(slots):
            h = getattr(parent, name).register_forward_pre_hook(make_hook(i), with_kwargs=True)
            stack.callback(h.remove)
        for batch in batches:
            if device is not None:
                batch = _to(batch, device)
            if isinstance(batch, Mapping):
                keep["mask"] = batch.get("attention_mask")
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                keep["mask"] = None
                model(*batch)
            else:
                keep["mask"] = None
                model(batch)
            if max_tokens is not None and min(counts) >= max_tokens:
                break
    return [torch.cat(s) if s else torch.empty(0) for s in store]


@torch.no_grad()
def kv_activations(model: nn.Module, acts: Sequence[Tensor], chunk: int = 4096) -> List[Tensor]:
    """Each layer's ``[k; v]`` for its attention inputs ``acts`` (one ``[M, D]`` per
    layer, e.g. from :func:`collect_activations`): the key before RoPE and the value,
    through the layer's own key/value map, flattened over the KV heads; ``[M, 2·Hkv·d]``
    float32 CPU tensors (what ``"kv"`` codebooks are fitted on)."""
    from .attention import AstraAttention
    from .models import resolve
    _, adapter = resolve(model)
    slots = adapter.attention_slots(model)
    if len(acts) != len(slots):
        raise ValueError(f"{len(acts)} layers of activations for a {len(slots)}-layer model")
    out = []
    for i, ((parent, name), x) in enumerate(zip(slots, acts)):
        a = getattr(parent, name)
        if not isinstance(a, AstraAttention):
            a = adapter.build(a, i, model)  # a wrapper around the same weights
        ref = next(a.parameters())
        x = x.reshape(-1, x.shape[-1])
        parts = [a.kv_vector(*a.project_kv(x[j:j + chunk].to(ref).unsqueeze(0)))[0]
                 .float().cpu() for j in range(0, x.shape[0], chunk)]
        width = 2 * a.num_kv_heads * a.head_dim
        out.append(torch.cat(parts) if parts else torch.empty(0, width))
    return out


def _to(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
