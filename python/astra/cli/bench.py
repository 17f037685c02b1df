"""``astra bench kernels | e2e | accuracy | llamacpp``."""
from __future__ import annotations

import argparse

from ..options import DECODE_WEIGHTS, GENERATE_WEIGHTS, RUN_STRATEGIES, STUDY_MODELS
from ._args import (
    add_timeout,
    csv_choices,
    csv_floats,
    nonnegative_float,
    nonnegative_int,
    pairs_of,
    positive_float,
    positive_int,
)


def register(sub) -> None:
    s = sub.add_parser("bench", help="benchmarks")
    bsub = s.add_subparsers(dest="suite", required=True)
    k = bsub.add_parser("kernels",
                        help="op microbenchmarks beside their anchors (faiss, SDPA, cdist)")
    k.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    k.add_argument("--quick", action="store_true", help="shorter timing loops")
    k.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    k.add_argument("--cases", help="comma-separated subset of case names")
    k.set_defaults(func=kernels_main)
    _register_e2e(bsub)
    _register_accuracy(bsub)
    _register_llamacpp(bsub)
    _register_reliability(bsub)
    _register_plan(bsub)


def kernels_main(args: argparse.Namespace) -> int:
    """Microbenchmarks: each op beside its anchors, one run, medians."""
    from astra.bench import kernels
    cases = args.cases.split(",") if args.cases else None
    if cases:
        unknown = sorted(set(cases) - set(kernels.CASE_NAMES))
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; known: {', '.join(kernels.CASE_NAMES)}")
    return kernels.main(args.device, args.json, args.quick, cases)


def _register_e2e(bsub) -> None:
    e = bsub.add_parser("e2e", help="end-to-end latency of single/tp/sp/astra over a link")
    e.add_argument("--model", default="vit-base",
                   help="vit-base | gpt2 | minilm | smollm2 | a local HF folder or .gguf file")
    e.add_argument("--devices", type=positive_int, default=4)
    e.add_argument("--bandwidth", type=csv_floats, default=[10.0], help="Mbit/s, comma-separated")
    e.add_argument("--latency-ms", type=nonnegative_float, default=0.5,
                   help="one-way latency per transfer")
    e.add_argument("--strategies", type=csv_choices(*RUN_STRATEGIES),
                   default=["single", "tp", "sp", "astra"],
                   help="comma-separated; auto: the planner's choice at each bandwidth")
    e.add_argument("--device-speeds", type=csv_floats, metavar="S1,S2,..",
                   help="emulated speed of each device (0.5: compute takes twice as long)")
    e.add_argument("--wire", type=csv_choices("fp32", "fp16", "int8"), default=["fp32"],
                   help="fp32,fp16,int8 (comma-separated): what sp, tp and ring send")
    e.add_argument("--link", choices=("emulated", "netns", "virtual"), default="emulated")
    e.add_argument("--tokens", type=positive_int, default=256, help="sequence length (text models)")
    e.add_argument("--medium", choices=("shared", "switched"), default="shared",
                   help="shared: one channel for all transfers (Wi-Fi); switched: per-port links")
    e.add_argument("--repeats", type=positive_int, default=3)
    e.add_argument("--warmup", type=nonnegative_int, default=1)
    e.add_argument("--decode", type=nonnegative_int, default=0, metavar="TOKENS",
                   help="causal LMs: also generate TOKENS after the prompt (single, astra): "
                   "TTFT, decode tokens/s, the whole request; with llama.cpp on one device "
                   "beside them where `astra bench llamacpp --build` has built it")
    e.add_argument("--decode-weights", type=csv_choices(*DECODE_WEIGHTS),
                   default=[GENERATE_WEIGHTS],
                   help="with --decode: fp32,int8 (comma-separated): the weights a decode "
                   "step reads, one row each")
    add_timeout(e, 300.0)
    e.add_argument("--json", metavar="PATH")
    e.add_argument("--plot", metavar="PATH.png")
    e.set_defaults(func=e2e_main)


def e2e_main(args: argparse.Namespace) -> int:
    import json

    from astra.bench import e2e
    from astra.catalog import get
    get(args.model)  # an unknown model fails here, before any rank starts
    rows = e2e.run_grid(args.model, args.devices, args.bandwidth, args.latency_ms,
                        args.strategies, args.wire, args.link, args.tokens, args.repeats,
                        medium=args.medium, warmup=args.warmup, decode_tokens=args.decode,
                        timeout_s=args.timeout, speeds=_speeds(args),
                        decode_weights=args.decode_weights)
    anchor = _llamacpp_anchor(args)
    if anchor:
        rows.append(anchor)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        e2e.plot(rows, args.plot)
    return 0


def _speeds(args: argparse.Namespace):
    from astra.parallel.planner import check_speeds
    return None if args.device_speeds is None else check_speeds(args.device_speeds,
                                                                args.devices)


def _llamacpp_anchor(args: argparse.Namespace):
    """llama.cpp on one device, same GGUF, one thread (as each rank), printed beside the
    table when it is built; None otherwise (or for a model that is no GGUF)."""
    from astra.bench import llamacpp
    try:
        gguf = llamacpp.resolve_model(args.model)
    except ValueError:
        return None
    got = llamacpp.anchor_rows(gguf, 1, args.tokens, max(args.decode, 1), repeats=2,
                               depth=args.tokens)
    if not got:
        print("(llama.cpp anchor: not built; `astra bench llamacpp --build` builds it once)")
        return None
    prompt_ms = 1e3 * args.tokens / got["pp_tok_s"]
    request = prompt_ms + 1e3 * max(args.decode - 1, 0) / got["tg_tok_s"]
    print(f"llama.cpp, one device, 1 thread: prompt {args.tokens} tokens {prompt_ms:.0f} ms "
          f"({got['pp_tok_s']:.0f} tok/s), decode {got['tg_tok_s']:.1f} tok/s after "
          f"{args.tokens} tokens of context"
          + (f", request {request:.0f} ms" if args.decode else ""))
    return dict(model=args.model, strategy="llama.cpp", wire="-", devices=1,
                ttft_ms=prompt_ms, decode_tok_s=got["tg_tok_s"], request_ms=request,
                pp_tok_s=got["pp_tok_s"], build=got.get("build"))


def _register_accuracy(bsub) -> None:
    p = bsub.add_parser("accuracy", help="accuracy study: single vs post-training vs "
                        "fine-tuned, and ablations (writes accuracy.json/.md/.png)")
    # astra.bench.accuracy.MODELS is STUDY_MODELS; its GRID is --grid's default (read
    # in accuracy_main: that module imports torch)
    p.add_argument("--models", default=",".join(STUDY_MODELS),
                   help=f"comma-separated subset of {', '.join(STUDY_MODELS)}")
    p.add_argument("--grid", help="(G x K) cells, e.g. 1x1024,32x1024")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per configuration")
    p.add_argument("--minilm-seeds", type=positive_int, default=1,
                   help="seeds for minilm (each fine-tune takes minutes on a CPU)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every model's fine-tuning steps (e.g. 0.1 for a smoke run)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablation-cells", default="1x1024,1x16",
                   help="(G x K) cells of the digits-vit ablations: the paper's 10 bits and "
                   "a harder 4 bits where post-training loses much more")
    p.add_argument("--out", default="bench/results", metavar="DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=accuracy_main)


def accuracy_main(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from astra.bench.accuracy import GRID, parse_cells, run_study
    models = [m for m in args.models.split(",") if m]
    grid = parse_cells(args.grid, "--grid") if args.grid is not None else list(GRID)
    cells = parse_cells(args.ablation_cells, "--ablation-cells")
    out = Path(args.out)
    t0 = time.perf_counter()
    md = run_study(models, grid, seeds=args.seeds, minilm_seeds=args.minilm_seeds,
                   steps_scale=args.steps_scale, ablations=not args.no_ablations,
                   ablation_cells=cells, out=out, progress=not args.quiet)
    print(md)
    print(f"rows: {out / 'accuracy.json'}; tables: {out / 'accuracy.md'}; plot: "
          f"{out / 'accuracy.png'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _register_llamacpp(bsub) -> None:
    p = bsub.add_parser("llamacpp", help="the LLM speed anchor: llama.cpp's llama-bench on one "
                        "device, same GGUF, same threads (build once with --build)")
    p.add_argument("--build", action="store_true",
                   help="build llama-bench first if missing (~10 min on 2 cores; needs cmake, "
                   "a C++ compiler and PyPI; cached)")
    p.add_argument("--model", default="smollm2", help="smollm2 | PATH.gguf")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--tokens", type=positive_int, default=2048, help="prompt tokens")
    p.add_argument("--gen", type=positive_int, default=128, help="decoded tokens")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.set_defaults(func=llamacpp_main)


def llamacpp_main(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    from astra.bench import llamacpp
    gguf = llamacpp.resolve_model(args.model)
    binary = llamacpp.llama_bench_path()
    try:
        if binary is None:
            if not args.build:
                raise ValueError("llama-bench is not built: run `astra bench llamacpp --build` "
                                 f"once (~10 min on 2 cores) or set ${llamacpp.ENV_BINARY}")
            t0 = time.perf_counter()
            binary = llamacpp.build(progress=True)
            print(f"built {binary} in {time.perf_counter() - t0:.0f} s")
        r = llamacpp.run(gguf, args.threads, args.tokens, args.gen, args.repeats, binary=binary)
    except llamacpp.LlamaCppError as e:
        print(f"astra bench llamacpp: {e}", file=sys.stderr)
        return 1
    print(llamacpp.format_result(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def _register_reliability(bsub) -> None:
    p = bsub.add_parser("reliability", help="quality against lost codes (0, 1, 5, 20%% packet "
                        "loss) through the runner, and the fault table")
    p.add_argument("--models", default="minilm,smollm2",
                   help="comma-separated catalogue models (causal LMs: perplexity; others: "
                   "cosine to one device)")
    p.add_argument("--devices", type=positive_int, default=4)
    p.add_argument("--tokens", type=positive_int, default=512)
    p.add_argument("--faults", action="store_true",
                   help="also inject each fault into a real run and time its report")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=reliability_main)


def reliability_main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from astra.bench import reliability
    from astra.catalog import get
    models = [m for m in args.models.split(",") if m]
    for m in models:
        get(m)  # an unknown model fails here, before any rank starts
    out = dict(loss=[], faults=[])
    for m in models:
        out["loss"] += reliability.quality_vs_loss(m, devices=args.devices, tokens=args.tokens)
    if args.faults:
        out["faults"] = reliability.fault_table()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0



def _register_plan(bsub) -> None:
    p = bsub.add_parser("plan", help="the planner: auto against single and the best split "
                        "over a grid of links, models and tokens; devices of different "
                        "speeds; a device dropping out")
    p.add_argument("--parts", type=csv_choices("grid", "hetero", "dropout", "wall"),
                   default=["grid", "hetero", "dropout"],
                   help="comma-separated (default grid,hetero,dropout; wall: predicted "
                   "against measured on the wall clock, as many ranks as cores, MiniLM, GPT-2 and "
                   "SmolLM2 at 512 tokens); with "
                   "--json the parts not run are kept from the file")
    p.add_argument("--cells", type=pairs_of(str, positive_int),
                   help="model:tokens pairs, comma-separated (default: minilm, gpt2 at 128 "
                   "and 512 tokens, smollm2 at 128, 512 and 2048)")
    p.add_argument("--links", type=pairs_of(positive_float, nonnegative_float),
                   help="Mbit/s:one-way ms pairs, comma-separated (default: 1, 10, 100 Mbit/s "
                   "x 0.5, 5, 20 ms)")
    p.add_argument("--repeats", type=positive_int, default=1)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH.png")
    p.set_defaults(func=plan_main)


def plan_main(args: argparse.Namespace) -> int:
    from astra.bench import planning
    planning.main(args.parts, args.json, args.plot, args.cells or planning.CELLS,
                  args.links or planning.LINKS, args.repeats)
    return 0
