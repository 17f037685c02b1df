"""``astra generate``: a prompt prefilled across N emulated devices, the answer streamed.

The ranks prefill the prompt over the link; the one holding the last chunk generates
alone from its compressed cache (nothing crosses the link while it decodes). Then the
numbers: time to first token, decode tokens/s, bytes each device sent, and the remote
part of the KV cache against fp16 keys/values of the same tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import DECODE_WEIGHTS, GENERATE_STRATEGIES, GENERATE_WEIGHTS
from ._args import add_timeout, csv_ints, nonnegative_float, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt prefilled across N devices",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | a local HF folder or .gguf file")
    p.add_argument("--devices", type=positive_int, default=4)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--strategy", choices=GENERATE_STRATEGIES, default="auto",
                   help="auto: the planner picks the prefill's devices and chunks, or one "
                   "device alone (default)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--decode-weights", choices=DECODE_WEIGHTS, default=GENERATE_WEIGHTS,
                   help="the weights a decode step reads: int8 (a quarter of the bytes; the "
                   "default) or fp32 (the model's own: HF's logits exactly)")
    p.add_argument("--bandwidth", type=positive_float, default=10.0, help="Mbit/s")
    p.add_argument("--latency-ms", type=nonnegative_float, default=0.5,
                   help="one-way latency per transfer")
    p.add_argument("--clock", choices=("virtual", "wall"), default="virtual",
                   help="virtual: each rank's CPU time on one timeline (more ranks than "
                   "cores); wall: real time with the link's waits")
    p.add_argument("--chunks", type=csv_ints, help="prompt tokens per rank (default: balanced)")
    p.add_argument("--temperature", type=positive_float,
                   help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=positive_float, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_timeout(p, 600.0)
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    p.set_defaults(func=main)


def _print_summary(row: dict) -> None:
    fp16, rem = row["remote_kv_fp16_bytes"], row["remote_kv_bytes"]
    if row.get("plan"):
        p = row["plan"]
        print(f"plan (auto): {p['strategy']} on {len(p['devices'])} device(s), predicted "
              f"prefill {p['predicted_ms']:.0f} ms")
    ratio = f" ({fp16 / rem:.0f}x smaller)" if rem else ""
    print(f"{row['strategy']} on {row['devices']} device(s), {row['prompt_tokens']} prompt "
          f"tokens, {row['new_tokens']} generated, {row['bandwidth_mbps']:g} Mbit/s "
          f"{row['clock']} clock")
    print(f"  TTFT {row['ttft_ms']:.0f} ms (prefill {row['prefill_ms']:.0f} ms)   decode "
          f"{row['decode_tok_s']:.1f} tokens/s ({row['decode_weights']} weights)")
    print(f"  bytes sent per device {row['bytes_per_device']:,}")
    print(f"  remote KV cache {rem:,} bytes for {row['remote_tokens']} tokens; fp16 K/V "
          f"would take {fp16:,}{ratio}")


def main(args: argparse.Namespace) -> int:
    from astra import textgen
    if args.top_p is not None and args.temperature is None:
        raise ValueError("--top-p needs --temperature")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"--prompt-file {path}: no such file")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    ids = textgen.prompt_ids(args.model, prompt, chat=args.chat)
    gen = dict(do_sample=False)
    if args.temperature is not None:
        gen = dict(do_sample=True, temperature=args.temperature, seed=args.seed)
        if args.top_p is not None:
            gen["top_p"] = args.top_p

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()
    row = textgen.generate(args.model, ids, devices=args.devices, strategy=args.strategy,
                           max_new_tokens=args.max_new_tokens, bandwidth_mbps=args.bandwidth,
                           latency_ms=args.latency_ms, clock=args.clock, chunks=args.chunks,
                           generation=gen, on_text=None if args.quiet else show,
                           timeout_s=args.timeout, decode_weights=args.decode_weights)
    if not args.quiet:
        print()
    _print_summary(row)
    if args.json:
        keys = ("text", "ttft_ms", "decode_tok_s", "bytes_per_device", "remote_kv_bytes",
                "remote_kv_fp16_bytes", "devices", "strategy")
        out = {k: row[k] for k in keys}
        out.update({k: v for k, v in row.items() if k not in out})
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
