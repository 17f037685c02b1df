"""``astra.patch`` / ``astra.unpatch``: explicit, reversible model patching.

``patch`` works on one model *instance*: it swaps each block's self-attention
submodule for an :class:`~astra.AstraAttention` (built around the same weight modules,
registered under the same names, so ``state_dict`` keys do not change) and, for
distributed class tokens, adds two hooks on the first and the last block. Nothing is
changed on any class, so other instances are unaffected. ``unpatch`` puts back the
very same original module objects and removes the hooks.

Dispatch is one table (:data:`astra.models.TABLE`): HF models by ``config.model_type``,
timm models by class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import decode as _decode
from . import models as _models
from .attention import AstraAttention, Communicator
from .codebooks import Codebooks

__all__ = ["patch", "unpatch", "is_patched", "supported_models"]

_ATTR = "_astra_patch"

supported_models = _models.supported_models


class _ClsState:
    """Shared by the hooks and the layers: the sequence length before expansion."""

    def __init__(self):
        self.orig_len: Optional[int] = None


@dataclass
class _PatchRecord:
    family: str
    devices: int
    distributed_cls: bool
    codebooks: Optional[Codebooks]
    swaps: List[Tuple[nn.Module, str, nn.Module, AstraAttention]] = field(default_factory=list)
    hooks: List[Any] = field(default_factory=list)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def patch(model: nn.Module, codebooks: Union[Codebooks, str, PathLike, None] = None,
          devices: int = 1, *, distributed_cls: Optional[bool] = None,
          communicator: Optional[Communicator] = None,
          use_kernels: Optional[bool] = None, strict: bool = True) -> nn.Module:
    """Make ``model`` run as ``devices`` devices that see each other through codebooks.

    Args:
        model: an HF ``bert``/``gpt2``/``vit``/Llama-family model (any head) or a timm
            ``VisionTransformer``; patched in place and returned.
        codebooks: :class:`Codebooks` (or a path to a saved file) with one codebook per
            layer; None: remote tokens are seen at full precision (with ``devices=1``
            the model then computes exactly what it computed before).
        devices: N, the number of (simulated) devices; in distributed mode it must be
            the communicator's ``world_size``.
        distributed_cls: give every device its own class-token copy (see
            :mod:`astra.attention`); default: on for models with a class token (BERT
            encoders, ViT, timm ViT with ``cls_token``), off otherwise.
        communicator: run in distributed mode: each call gets this rank's chunk only
            and exchanges codes through it (the runner supplies it).
        use_kernels: None = the fused kernels whenever no gradient is needed (eval
            under ``torch.no_grad()``), else the differentiable torch path; False =
            always torch; True = always kernels (error if autograd needs the result).
        strict: check the codebooks' model identity and config hash against the model
            (layer count, width, G and K are always checked).

    Raises:
        ValueError: unsupported model type (the message lists the supported ones),
            codebooks of another model / layer count / width, bad ``devices``, a
            sequence shorter than ``devices`` (fixed-size vision models; others raise
            at forward time), ``distributed_cls`` on a causal model.
        RuntimeError: the model is already patched.
    """
    key, adapter = _models.resolve(model)
    if is_patched(model):
        raise RuntimeError("model is already patched by Astra; call astra.unpatch(model) first")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    if communicator is not None:
        ws = int(communicator.world_size)
        if devices not in (1, ws):
            raise ValueError(f"devices={devices} but the communicator's world_size is {ws}")
        devices = ws
    if distributed_cls is None:
        distributed_cls = adapter.has_cls(model)
    elif distributed_cls and not adapter.has_cls(model):
        raise ValueError(f"distributed_cls=True but {key} models "
                         + ("are causal" if adapter.causal else "have no class token"))
    seq = adapter.seq_len(model)
    if seq is not None and communicator is None:
        content = seq - (1 if distributed_cls else 0)
        if devices > content:
            raise ValueError(f"devices={devices} is larger than the sequence ({seq} tokens"
                             + (", one of them the class token" if distributed_cls else "")
                             + "): every device needs at least one token")

    ident = adapter.identity(model)
    if codebooks is not None:
        if not isinstance(codebooks, Codebooks):
            codebooks = Codebooks.load(codebooks, expect=ident if strict else
                                       {k: ident[k] for k in ("num_layers", "dim", "kv_dim")})
        else:
            codebooks.check(ident if strict else
                            {k: ident[k] for k in ("num_layers", "dim", "kv_dim")})

    slots = adapter.attention_slots(model)
    originals = [getattr(parent, name) for parent, name in slots]
    for i, orig in enumerate(originals):  # validate everything before changing anything
        if isinstance(orig, AstraAttention):
            raise RuntimeError(f"layer {i} already holds an AstraAttention")
        adapter.check_original(orig, i)

    state = _ClsState()
    record = _PatchRecord(key, devices, bool(distributed_cls), codebooks)
    for i, ((parent, name), orig) in enumerate(zip(slots, originals)):
        new = adapter.build(orig, i, model)
        new.train(orig.training)
        new.configure(codebook=None if codebooks is None else codebooks.layer(i),
                      devices=devices, distributed_cls=bool(distributed_cls),
                      communicator=communicator, use_kernels=use_kernels, cls_state=state,
                      stage_sizes=None if codebooks is None else codebooks.stages(i),
                      target="x" if codebooks is None else codebooks.target)
        setattr(parent, name, new)
        record.swaps.append((parent, name, orig, new))

    if distributed_cls and communicator is None and devices > 1:
        layers = adapter.layers(model)
        record.hooks.append(layers[0].register_forward_pre_hook(
            _ExpandCls(state, devices), with_kwargs=True))
        record.hooks.append(layers[-1].register_forward_hook(_PoolCls(state, devices)))
    object.__setattr__(model, _ATTR, record)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original attention modules (the same objects) go back
    and the hooks are removed. Returns the model."""
    record: Optional[_PatchRecord] = getattr(model, _ATTR, None)
    if record is None:
        raise ValueError("model is not patched by Astra")
    _decode.uninstall(model)
    for h in record.hooks:
        h.remove()
    for parent, name, orig, new in reversed(record.swaps):
        orig.train(new.training)
        setattr(parent, name, orig)
    object.__delattr__(model, _ATTR)
    return model


class _ExpandCls:
    """Pre-hook on the first block: ``[cls, t...] -> [cls_0 .. cls_{N-1}, t...]``."""

    def __init__(self, state: _ClsState, devices: int):
        self.state, self.devices = state, devices

    def __call__(self, module, args, kwargs):
        if args:
            x, args = args[0], args[1:]
            key = None
        else:
            key = "hidden_states" if "hidden_states" in kwargs else "x"
            x = kwargs[key]
        T = x.shape[1]
        if T - 1 < self.devices:
            raise ValueError(f"devices={self.devices} is larger than the sequence ({T} "
                             f"tokens, {T - 1} besides the class token): every device "
                             "needs at least one token")
        self.state.orig_len = T
        x = torch.cat([x[:, :1].expand(-1, self.devices, -1), x[:, 1:]], dim=1)
        if key is None:
            return (x,) + tuple(args), kwargs
        kwargs = dict(kwargs)
        kwargs[key] = x
        return args, kwargs


class _PoolCls:
    """Hook on the last block: the N class-token copies -> their mean, at index 0."""

    def __init__(self, state: _ClsState, devices: int):
        self.state, self.devices = state, devices

    def __call__(self, module, args, output):
        h = output if isinstance(output, Tensor) else output[0]
        N = self.devices
        if self.state.orig_len is None or h.shape[1] != self.state.orig_len + N - 1:
            return None
        h = torch.cat([h[:, :N].mean(dim=1, keepdim=True), h[:, N:]], dim=1)
        if isinstance(output, Tensor):
            return h
        return (h,) + tuple(output[1:])
