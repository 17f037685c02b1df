"""``astra demo``: the main job in one command.

- :mod:`astra.demo.llm` (the default): SmolLM2 answers a question about ~2,000 tokens of
  documentation across 4 emulated devices; TTFT and the whole request against one
  device, the int8 baselines and llama.cpp.
- :mod:`astra.demo.minilm` (``--model minilm``): MiniLM sentence embeddings across 4
  devices; latency against single / tp / sp and the embedding fidelity.
"""
from . import llm, minilm

MODELS = {"smollm2": llm, "minilm": minilm}

__all__ = ["MODELS", "llm", "minilm"]
