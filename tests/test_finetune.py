"""astra.finetune: the training-time quantizer (STE, NAQ noise, commitment, EMA,
re-seeding), determinism, resuming, checkpoints, and that fine-tuning helps."""
import dataclasses

import pytest
import torch

import astra
from astra import AstraAttention, Codebooks
from astra.attention import chunk_layout
from astra.checkpoint import load_checkpoint
from astra.finetune import (
    ClassificationObjective,
    FinetuneConfig,
    HiddenObjective,
    LMObjective,
    NoiseAugmentedQuantizer,
    finetune,
    objective_for,
)

# ----------------------------------------------------------------------------- fixtures

def _vit(seed=0, layers=2, labels=3):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=64, image_size=16, patch_size=4, num_labels=labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _vit_batches(n=4, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(b, 3, 16, 16, generator=g),
             "labels": torch.randint(3, (b,), generator=g)} for _ in range(n)]


def _gpt2_batches(n=3, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(50, (b, 24), generator=g)} for _ in range(n)]


def _codebooks(model, batches, G=1, K=8, seed=0):
    from astra.calibrate import fit_kmeans
    from astra.codebooks import collect_activations
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    acts = collect_activations(model, inputs)
    return fit_kmeans(acts, G, K, iters=3, seed=seed, model=model, progress=False)


CFG = FinetuneConfig(devices=2, steps=4, lr=1e-3, codebook_lr=1e-2, warmup=1, noise=0.3,
                     commitment=1e-3, reseed_every=2, seed=3)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- quantizer

def _module_with_codebook(G=2, K=5, D=8, stages=None, seed=0):
    model = _gpt2()
    g = torch.Generator().manual_seed(seed)
    L = model.config.n_layer
    if stages:
        cb = Codebooks(torch.randn(L, len(stages), max(stages), 32, generator=g),
                       stage_sizes=stages)
    else:
        cb = Codebooks(torch.randn(L, G, K, 32 // G, generator=g))
    astra.patch(model, cb, devices=2, strict=False)
    return model, [m for m in model.modules() if isinstance(m, AstraAttention)][0]


@pytest.mark.parametrize("update", ["grad", "ema"])
@pytest.mark.parametrize("stages", [None, (6, 3)])
def test_zero_noise_zero_commitment_is_the_plain_straight_through_path(update, stages):
    _, attn = _module_with_codebook(stages=stages)
    attn.codebook = attn.codebook.detach().clone().requires_grad_(update == "grad")
    x = torch.randn(2, 7, 32, requires_grad=True)
    layout = chunk_layout(7, 2)
    q = NoiseAugmentedQuantizer(noise=0.0, commitment=0.0, codebook_update=update)
    out = q(attn, x, layout)
    xhat = attn.dequantize(attn.encode(x), torch.float32).detach()
    plain = x + (xhat - x).detach()
    assert torch.equal(out, plain)
    assert q.pop_aux_loss() is None
    w = torch.randn_like(out)
    gx, = torch.autograd.grad((out * w).sum(), x, retain_graph=True)
    assert torch.equal(gx, w)  # straight through: the gradient reaches x unchanged
    if update == "grad":  # the codebook gets the task gradient through its lookups
        gcb, = torch.autograd.grad((out * w).sum(), attn.codebook)
        assert gcb.abs().sum() > 0


def test_commitment_loss_and_its_gradient():
    _, attn = _module_with_codebook()
    attn.codebook = attn.codebook.detach().clone().requires_grad_(True)
    x = torch.randn(2, 6, 32, requires_grad=True)
    q = NoiseAugmentedQuantizer(commitment=0.25, codebook_update="grad")
    q(attn, x, chunk_layout(6, 2))
    aux = q.pop_aux_loss()
    xhat = attn.dequantize(attn.encode(x), torch.float32).detach()
    assert torch.allclose(aux, 0.25 * ((x - xhat) ** 2).mean())
    gx, gcb = torch.autograd.grad(aux, [x, attn.codebook], allow_unused=True)
    assert torch.allclose(gx, 0.25 * 2 * (x - xhat) / x.numel())
    assert gcb is None or gcb.abs().sum() == 0  # commitment moves x, not the codebook


def test_naq_noise_has_the_residual_variance_per_group():
    _, attn = _module_with_codebook(G=2, K=3)
    x = torch.randn(4, 400, 32)
    x[..., 16:] *= 5  # group 1 has a much larger residual than group 0
    layout = chunk_layout(400, 2)
    gen = torch.Generator().manual_seed(0)
    q0 = NoiseAugmentedQuantizer(noise=0.0, codebook_update="ema")
    q1 = NoiseAugmentedQuantizer(noise=0.5, codebook_update="ema", generator=gen)
    noise = q1(attn, x, layout) - q0(attn, x, layout)
    resid = x - attn.dequantize(attn.encode(x), torch.float32)
    for g in range(2):
        sl = slice(16 * g, 16 * (g + 1))
        want = 0.5 * resid[..., sl].pow(2).mean().sqrt()
        got = noise[..., sl].std()
        assert abs(got / want - 1) < 0.03, (g, float(got), float(want))
        assert abs(float(noise[..., sl].mean())) < 0.03 * float(want)


def test_noise_is_never_applied_at_inference():
    model, batches = _vit(), _vit_batches()
    cb = _codebooks(model, batches)
    x = batches[0]["pixel_values"]
    astra.patch(model, cb, devices=2)
    attns = [m for m in model.modules() if isinstance(m, AstraAttention)]
    outs = []
    for lam in (0.0, 1.0):
        for a in attns:
            a.quantizer = NoiseAugmentedQuantizer(noise=lam, codebook_update="ema")
        model.eval()
        with torch.no_grad():
            outs.append(model(pixel_values=x).logits)
        outs.append(model(pixel_values=x).logits.detach())  # eval mode, autograd on
        model.train()
        outs.append(model(pixel_values=x).logits.detach())  # training: noise only at λ=1
    assert torch.equal(outs[0], outs[3]) and torch.equal(outs[1], outs[4])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(outs[2], outs[1], atol=1e-5)  # λ=0 in training: no noise
    assert not torch.allclose(outs[5], outs[2], atol=1e-3)  # λ=1 in training: noise


# ----------------------------------------------------------------------------- training

def test_finetune_is_deterministic_for_a_seed():
    batches = _vit_batches()
    cb = _codebooks(_vit(), batches)
    runs = []
    for _ in range(2):
        m = _vit()
        r = finetune(m, cb, batches, config=CFG, progress=False)
        runs.append((_params(m), r.codebooks.tensor, [h["loss"] for h in r.history]))
    (p0, c0, l0), (p1, c1, l1) = runs
    assert l0 == l1
    assert torch.equal(c0, c1)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    other = finetune(_vit(), cb, batches, config=dataclasses.replace(CFG, seed=4),
                     progress=False)
    assert not torch.equal(other.codebooks.tensor, c0)


@pytest.mark.parametrize("update", ["grad", "ema"])
def test_resume_equals_an_uninterrupted_run(tmp_path, update):
    batches = _vit_batches()
    cb = _codebooks(_vit(), batches)
    cfg = dataclasses.replace(CFG, codebook_update=update, steps=5, save_every=2)
    full = _vit()
    r_full = finetune(full, cb, batches, config=cfg, progress=False)
    def interrupt(row):  # a crash after step 3: the last checkpoint is step 2's
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(_vit(), cb, batches, config=cfg, out_dir=tmp_path, progress=False,
                 callback=interrupt)
    assert torch.load(tmp_path / "trainer.pt", weights_only=False)["step"] == 2
    resumed = _vit()
    r_res = finetune(resumed, cb, batches, config=cfg, out_dir=tmp_path, resume=True,
                     progress=False)
    assert [h["loss"] for h in r_res.history] == [h["loss"] for h in r_full.history]
    assert torch.equal(r_res.codebooks.tensor, r_full.codebooks.tensor)
    pf, pr = _params(full), _params(resumed)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_resume_refuses_another_config_or_no_checkpoint(tmp_path):
    batches = _vit_batches(n=2)
    cb = _codebooks(_vit(), batches)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune(_vit(), cb, batches, config=CFG, out_dir=tmp_path, resume=True)
    finetune(_vit(), cb, batches, config=dataclasses.replace(CFG, steps=1),
             out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="noise: checkpoint 0.3, now 0.5"):
        finetune(_vit(), cb, batches, config=dataclasses.replace(CFG, noise=0.5),
                 out_dir=tmp_path, resume=True)


def test_a_diverged_loss_stops_before_the_weights_change(tmp_path):
    batches = _vit_batches(n=2)
    cb = _codebooks(_vit(), batches)

    class Diverges(ClassificationObjective):
        def task_loss(self, out, batch):
            return super().task_loss(out, batch) * float("nan")

    m = _vit()
    before = _params(m)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 1"):
        finetune(m, cb, batches, config=CFG, objective=Diverges(), out_dir=tmp_path,
                 progress=False)
    after = _params(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "model.safetensors").exists()  # no checkpoint of garbage

def test_saved_and_loaded_model_evaluates_bit_identically(tmp_path):
    batches = _gpt2_batches()
    model = _gpt2()
    cb = _codebooks(model, batches)
    res = finetune(model, cb, batches, config=dataclasses.replace(CFG, steps=3),
                   out_dir=tmp_path, progress=False)
    assert (tmp_path / "loss.png").stat().st_size > 0
    ids = batches[0]["input_ids"]

    def evaluate(m, c):
        astra.patch(m, c, devices=2)
        try:
            with torch.no_grad():
                return m(input_ids=ids).logits
        finally:
            astra.unpatch(m)

    before = evaluate(model, res.codebooks)
    fresh = _gpt2(seed=5)  # other random weights: everything must come from the files
    cb2 = load_checkpoint(fresh, tmp_path)
    assert torch.equal(cb2.tensor, res.codebooks.tensor)
    assert torch.equal(evaluate(fresh, cb2), before)
    # the tied LM head follows the loaded embedding
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_load_checkpoint_rejects_another_model(tmp_path):
    batches = _gpt2_batches(n=1)
    model = _gpt2()
    finetune(model, _codebooks(model, batches), batches,
             config=dataclasses.replace(CFG, steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="do not match the model"):
        load_checkpoint(_vit(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finetune checkpoint"):
        load_checkpoint(_gpt2(), tmp_path / "nothing")


def test_load_checkpoint_names_a_damaged_or_non_finite_weights_file(tmp_path):
    from safetensors.torch import load_file, save_file
    batches = _gpt2_batches(n=1)
    model = _gpt2()
    finetune(model, _codebooks(model, batches), batches,
             config=dataclasses.replace(CFG, steps=1), out_dir=tmp_path, progress=False)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))
    fresh = _gpt2(seed=7)
    before = _params(fresh)
    with pytest.raises(ValueError, match=rf"model.safetensors has non-finite .*{name}"):
        load_checkpoint(fresh, tmp_path)
    weights.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match="model.safetensors is damaged or not a safetensors"):
        load_checkpoint(fresh, tmp_path)
    after = _params(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched
    weights.write_bytes(good)
    load_checkpoint(fresh, tmp_path)  # the intact file loads


def test_finetuning_reduces_the_distillation_loss_and_keeps_the_original_untouched():
    batches = _gpt2_batches(n=2)
    model = _gpt2()
    cb = _codebooks(model, batches, K=4)
    cb_before = cb.tensor.clone()
    cfg = FinetuneConfig(devices=2, steps=40, lr=3e-3, codebook_lr=1e-2, warmup=2, noise=0.0,
                         commitment=0.0, task_weight=0.0, reseed_every=0, seed=0)
    res = finetune(model, cb, batches, config=cfg, progress=False)
    first = sum(h["distill"] for h in res.history[:4]) / 4
    last = sum(h["distill"] for h in res.history[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert torch.equal(cb.tensor, cb_before)  # the caller's codebooks are not modified
    assert not astra.is_patched(model) and not model.training
    assert all(a.quantizer is None for a in model.modules() if isinstance(a, AstraAttention))


def test_ema_moves_codewords_to_the_mean_of_their_inputs():
    from astra.codebooks import collect_activations
    batches = _vit_batches(n=1)
    model = _vit()
    cb = _codebooks(model, batches, K=6)
    # layer 0's input does not depend on the codebooks; the class token is not sent
    x0 = collect_activations(model, [{"pixel_values": batches[0]["pixel_values"]}])[0]
    x0 = x0.reshape(len(batches[0]["labels"]), -1, 32)[:, 1:].reshape(-1, 32)
    codes = cb.encode(0, x0)[:, 0].long()
    cfg = FinetuneConfig(devices=2, steps=1, codebook_update="ema", ema_decay=0.0, lr=0.0,
                         noise=0.0, commitment=0.0, reseed_every=0, seed=0, warmup=0)
    res = finetune(model, cb, batches, config=cfg, progress=False)
    new = res.codebooks.layer(0)[0]
    for k in range(6):
        sel = codes == k
        if sel.any():
            assert torch.allclose(new[k], x0[sel].mean(0), atol=1e-4), k


def test_dead_codewords_are_reseeded_from_inputs():
    batches = _vit_batches(n=2)
    model = _vit()
    cb = _codebooks(model, batches, K=6)
    cb.tensor[:, :, 5] = 1e4  # a codeword nobody will ever choose
    for update in ("grad", "ema"):
        cfg = FinetuneConfig(devices=2, steps=3, codebook_update=update, lr=1e-4, noise=0.0,
                             commitment=0.0, reseed_every=2, seed=0, warmup=0)
        res = finetune(_vit(), cb, batches, config=cfg, progress=False)
        assert all(n >= 1 for n in res.codebooks.reseeded), update
        assert float(res.codebooks.tensor[:, :, 5].abs().max()) < 100, update


def test_objective_for_picks_by_head():
    assert isinstance(objective_for(_vit()), ClassificationObjective)
    assert isinstance(objective_for(_gpt2()), LMObjective)
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, vocab_size=50))
    assert isinstance(objective_for(bert), HiddenObjective)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="codebook_update"):
        FinetuneConfig(codebook_update="sgd")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="noise must be a finite number"):
        FinetuneConfig(noise=-1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        FinetuneConfig(ema_decay=1.0)
    model, batches = _vit(), _vit_batches(n=1)
    cb = _codebooks(model, batches)
    with pytest.raises(TypeError, match="astra.Codebooks"):
        finetune(model, cb.tensor, batches, config=CFG)
    with pytest.raises(ValueError, match="at least one batch"):
        finetune(model, cb, [], config=CFG)
    astra.patch(model, cb, devices=2)
    with pytest.raises(ValueError, match="unpatched model"):
        finetune(model, cb, batches, config=CFG)


def test_patched_gpt2_trains_with_attention_dropout():
    # GPT-2's attention has a submodule called attn_dropout: training mode must work
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                       vocab_size=50, attn_pdrop=0.5))
    ids = _gpt2_batches(n=1)[0]["input_ids"]
    astra.patch(model, None, devices=2)
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b)  # dropout is active
    a.sum().backward()


def test_zero_learning_rates_change_nothing():
    # the training forward is the evaluation forward (λ=0): with nothing learned, every
    # step sees the same loss and the codebooks come back unchanged (no re-seeding
    # before step reseed_every)
    batches = _vit_batches(n=1)
    model = _vit()
    cb = _codebooks(model, batches)
    before = _params(model)
    cfg = FinetuneConfig(devices=2, steps=4, lr=0.0, codebook_lr=0.0, noise=0.0,
                         commitment=0.0, reseed_every=5, warmup=0)
    res = finetune(model, cb, batches, config=cfg, progress=False)
    losses = [h["loss"] for h in res.history]
    assert losses == [losses[0]] * 4
    assert torch.equal(res.codebooks.tensor, cb.tensor)
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # and it is the loss of the patched model in eval mode
        ref = model(pixel_values=batches[0]["pixel_values"]).logits
        astra.patch(model, cb, devices=2)
        out = model(pixel_values=batches[0]["pixel_values"])
    lab = batches[0]["labels"]
    want = (torch.nn.functional.cross_entropy(out.logits, lab)
            + ClassificationObjective().distill_loss(out.logits, ref, None, 1.0))
    assert abs(float(want) - losses[0]) < 1e-5


def test_per_layer_residual_budgets_train_and_keep_their_shape():
    # layer 0: 8 codewords + a size-1 stage (no bits), layer 1: 8 + 4 (5 bits)
    model = _gpt2()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 2, 8, 32, generator=g)
    t[0, 1, 1:] = 0
    t[1, 1, 4:] = 0
    cb = Codebooks(t, stage_sizes=[(8, 1), (8, 4)])
    assert cb.bits_per_token == 4  # (3 + 5) / 2
    cfg = FinetuneConfig(devices=2, steps=3, lr=1e-3, codebook_lr=1e-2, warmup=0, noise=0.3,
                         commitment=1e-3, reseed_every=2, seed=0)
    res = finetune(model, cb, _gpt2_batches(n=2), config=cfg, progress=False)
    out = res.codebooks
    assert [out.stages(i) for i in range(2)] == [(8, 1), (8, 4)]
    assert out.bits_per_token == 4
    # the rows past each stage's size stay zero; the trained rows moved
    assert out.tensor[0, 1, 1:].abs().max() == 0 and out.tensor[1, 1, 4:].abs().max() == 0
    assert not torch.equal(out.tensor[1, 1, :4], t[1, 1, :4])


def test_layer_residual_argument():
    from astra.cli._args import layer_stages_arg
    assert layer_stages_arg(["-1:4096,4096", "0:16"]) == ((-1, (4096, 4096)), (0, (16,)))
    assert layer_stages_arg(["2:256x3"]) == ((2, (256, 256, 256)),)
    assert layer_stages_arg(["1-3:1", "-1:8"]) == ((1, (1,)), (2, (1,)), (3, (1,)), (-1, (8,)))
    for bad in ("-1", "x:16", "1:a", "1-2:a"):
        with pytest.raises(ValueError, match="LAYER:K2"):
            layer_stages_arg([bad])
    with pytest.raises(ValueError, match="is empty"):
        layer_stages_arg(["3-1:16"])
