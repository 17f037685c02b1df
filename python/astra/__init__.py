"""Astra: sequence-parallel Transformer inference over slow links.

Each device runs every layer for its own chunk of tokens and sees the other
devices' tokens through vector-quantized codes of their attention input
(ASTRA, arXiv 2505.19342). The kernels live in :mod:`astra_kernels`.
"""
import astra_kernels as kernels  # noqa: F401

__version__ = kernels.__version__
