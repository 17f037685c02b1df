"""Sequence-parallel execution across processes/devices: runner, links, baselines.

- :mod:`~astra.parallel.runner`: launch N ranks (local processes, netns namespaces or
  ``torchrun`` across hosts) and run single / sp / tp / astra jobs on them.
- :mod:`~astra.parallel.comm`: the communicator (framed point-to-point collectives, link
  emulation on the real transfers, wall or virtual clock, timeouts).
- :mod:`~astra.parallel.wire`: the frame header and payload encodings (codes, fp32,
  fp16, int8 with per-token absmax scale).
- :mod:`~astra.parallel.staged`: a model as embed / blocks / tail stages, and the
  Megatron-style tensor-parallel block.
- :mod:`~astra.parallel.links`: the link model; :mod:`~astra.parallel.netns`: a real
  rate-limited network of namespaces.
"""
