"""Astra: sequence-parallel Transformer inference over slow links.

Each device runs every layer for its own chunk of tokens and sees the other
devices' tokens through vector-quantized codes of their attention input
(ASTRA, arXiv 2505.19342). The kernels live in :mod:`astra_kernels`.

The package is lazy: ``import astra`` imports no torch, so ``astra --help`` and the
command line's refusals of bad arguments stay quick. Each name below is imported on
first use (``astra.patch``, ``from astra import Codebooks``).
"""
import importlib
import sys
import types

# public name -> the submodule that defines it
_LAZY = {
    "AstraAttention": "attention", "ChunkLayout": "attention", "Communicator": "attention",
    "chunk_layout": "attention", "Codebooks": "codebooks",
    "collect_activations": "codebooks", "supported_models": "models",
    "is_patched": "patch", "unpatch": "patch", "AstraCache": "generation",
}

__all__ = [
    "AstraAttention", "AstraCache", "ChunkLayout", "Communicator", "chunk_layout", "Codebooks",
    "collect_activations", "patch", "unpatch", "is_patched", "supported_models",
    "kernels", "__version__",
]


class _Astra(types.ModuleType):
    """The ``astra`` module's type: ``astra.patch`` is always the function.

    The submodule :mod:`astra.patch` has the function's name, and importing a submodule
    binds it on its package (``setattr(astra, "patch", <module>)``) whenever that happens
    first, e.g. ``from astra.patch import unpatch``. That binding is dropped here; any
    other value (a test's stand-in) replaces the function until it is deleted.
    """

    @property
    def patch(self):
        if "patch" in self.__dict__:
            return self.__dict__["patch"]
        return importlib.import_module(f"{__name__}.patch").patch

    @patch.setter
    def patch(self, value):
        if not isinstance(value, types.ModuleType):
            self.__dict__["patch"] = value

    @patch.deleter
    def patch(self):
        self.__dict__.pop("patch", None)


sys.modules[__name__].__class__ = _Astra


def __getattr__(name):
    if name in ("kernels", "__version__"):  # astra.__version__ is the kernels' version
        kernels = globals()["kernels"] = importlib.import_module("astra_kernels")
        return kernels if name == "kernels" else kernels.__version__
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(f".{_LAZY[name]}", __name__),
                                          name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
