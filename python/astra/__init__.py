"""Astra: sequence-parallel Transformer inference over slow links.

Each device runs every layer for its own chunk of tokens and sees the other
devices' tokens through vector-quantized codes of their attention input
(ASTRA, arXiv 2505.19342). The kernels live in :mod:`astra_kernels`.
"""
import astra_kernels as kernels  # noqa: F401

__version__ = kernels.__version__

from .attention import AstraAttention, ChunkLayout, Communicator, chunk_layout  # noqa: E402
from .codebooks import Codebooks, collect_activations  # noqa: E402
from .models import supported_models  # noqa: E402
from .patch import is_patched, patch, unpatch  # noqa: E402

__all__ = [
    "AstraAttention", "AstraCache", "ChunkLayout", "Communicator", "chunk_layout", "Codebooks",
    "collect_activations", "patch", "unpatch", "is_patched", "supported_models",
    "kernels", "__version__",
]


def __getattr__(name):  # AstraCache imports transformers: only when asked for
    if name == "AstraCache":
        from .generation import AstraCache
        return AstraCache
    raise AttributeError(f"module 'astra' has no attribute {name!r}")
