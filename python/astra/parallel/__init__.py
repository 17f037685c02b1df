"""Sequence-parallel execution across processes/devices: runner, links, baselines.

- :mod:`~astra.parallel.runner`: the public face: launch N ranks (local processes,
  netns namespaces; ``torchrun`` across hosts via :mod:`astra.cli.torchrun`) and run
  single / sp / tp / astra jobs on them; :mod:`~astra.parallel.job` (the job model),
  :mod:`~astra.parallel.worker` (one rank; strategies as a table),
  :mod:`~astra.parallel.launcher` (processes, watched).
- :mod:`~astra.parallel.comm`: the communicator (framed point-to-point collectives, link
  emulation on the real transfers, wall or virtual clock, timeouts).
- :mod:`~astra.parallel.wire`: the frame header and payload encodings (codes, fp32,
  fp16, int8 with per-token absmax scale).
- :mod:`~astra.parallel.tp`: the Megatron-style tensor-parallel block (a model's
  stages come from its family adapter, :mod:`astra.models`).
- :mod:`~astra.parallel.links`: the link model; :mod:`~astra.parallel.netns`: a real
  rate-limited network of namespaces.
"""
