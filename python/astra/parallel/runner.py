"""The runner: one process per rank, ``torch.distributed`` over gloo, every rank holding
the weights and its contiguous chunk of tokens. Ranks compute on the CPU, or on a GPU
(``device="cuda"``, ``astra run --device cuda``: rank r on GPU ``r % count``); frames
always travel as host bytes over gloo — per layer a rank sends a few hundred bytes of
codes, which needs no NCCL, and several ranks can share one GPU. (No NCCL transport:
the sp/tp baselines' large fp32 payloads on a fast GPU interconnect are not what this
runner measures.)

This module is the runner's public face; the parts live beside it:
:mod:`~astra.parallel.job` (what a run is: :class:`Job`, chunks, wire widths, summary),
:mod:`~astra.parallel.worker` (one rank: the strategy table, timing),
:mod:`~astra.parallel.launcher` (local processes, watched; nothing left running),
:mod:`~astra.parallel.comm` (the communicator), :mod:`~astra.parallel.tp` (the
tensor-parallel block). A worker runs a list of :class:`Job` s (several strategies
share one start-up); models come from :mod:`astra.catalog` as a :class:`ModelSpec`.

Per layer, ``astra`` strategy (:class:`astra.AstraAttention` in distributed mode, with
:class:`~astra.parallel.comm.DistCommunicator`): ``vq_encode`` the local attention input
-> ``pack_codes`` -> framed ``isend``/``irecv`` to the ranks that need it (all others;
later ranks only for causal models) -> the local partial attention (own tokens, full
precision) runs while the bytes travel -> wait (link emulation) -> remote partial from
the received codes through the projected codebooks -> ``merge_attention``.
At the end each rank sends a summary (``output="compact"``) or its hidden states
(``"full"``) to rank 0, which pools the class-token copies and applies the model's tail.

Strategies: ``single`` (rank 0 alone, the plain model), ``sp`` (the same seam, the full
attention input on the wire as fp32/fp16/int8), ``tp`` (Megatron: column/row-parallel
linears, two all-reduces per block, on the wire as fp32/fp16/int8), ``astra``.

Across real hosts (two machines, one rank each; the link is real, no emulation)::

    # host A (10.0.0.1) and host B, same command but --node_rank 0 / 1:
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0 \\
        --master_addr 10.0.0.1 --master_port 29511 \\
        -m astra.cli.torchrun --model gpt2 --strategy astra --tokens 1024

(``GLOO_SOCKET_IFNAME`` picks the interface when a host has several.) ``--codebooks PATH``
(a saved :class:`astra.Codebooks` file) or ``--checkpoint DIR`` (an ``astra finetune``
folder: weights and codebooks) replace the quickly fitted codebooks; every host needs
the same file. ``astra run`` takes the same two options.

Codes on the wire: grouped codebooks send G codes of ``ceil(log2 K)`` bits per token;
residual codebooks (``Codebooks(..., stage_sizes=...)``, per layer or for all) send each
stage's code at its own width ``ceil(log2 K_s)`` (nothing for a stage of size 1), the
widths per layer being part of the set-up (:mod:`astra.parallel.wire`, ``rcodes``).
"""
from __future__ import annotations

from astra.catalog import ModelSpec

from .job import (
    Job,
    RunnerError,
    check_chunks,
    check_device,
    default_chunks,
    job_codebooks,
    summarize,
    wire_bits,
)
from .launcher import launch
from .worker import exit_now as _exit_now  # noqa: F401 (tests)

__all__ = ["Job", "RunnerError", "launch", "default_chunks", "ModelSpec", "summarize",
           "job_codebooks", "wire_bits", "check_device", "check_chunks"]


if __name__ == "__main__":  # the entry of earlier versions
    raise SystemExit("the torchrun entry is now `python -m astra.cli.torchrun ...` "
                     "(the same options); workers are `python -m astra.parallel.worker`")
