"""The names and defaults the command line offers, declared where no torch is imported.

``astra --help`` and argparse's refusals of a bad argument must come back in well under
a second, before torch (seconds to import) is loaded. So the choices and defaults that
the parsers (:mod:`astra.cli`) show live here, and the modules that own them import them
from here (one source of truth): the strategies of :mod:`astra.parallel.job` and
:mod:`astra.textgen`, the catalogue's model names (:mod:`astra.catalog`; a test checks
they match its rows), the models the accuracy study fine-tunes
(:mod:`astra.catalog.tasks`), and the defaults of :class:`astra.calibrate.Method`,
:mod:`astra.evaluate_llm` and :class:`astra.finetune.FinetuneConfig`.

This module imports nothing.
"""

# ---------------------------------------------------------------------- models, strategies

# astra.catalog.CATALOG's rows, in order (``--model`` of ``astra run``)
MODEL_NAMES = ("vit-base", "gpt2", "minilm", "byte-gpt2", "digits-vit", "smollm2",
               "link-probe", "tiny-gpt2", "tiny-bert", "tiny-hf-vit")
# astra.catalog.tasks: the models the accuracy study and ``astra finetune`` train
STUDY_MODELS = ("digits-vit", "byte-gpt2", "minilm")
# astra.parallel.job: what a job runs (``astra run --strategy``, ``astra bench e2e``)
STRATEGIES = ("single", "sp", "tp", "astra", "ring")
# ``astra run``: a strategy, or ``auto`` (astra.parallel.planner picks one)
RUN_STRATEGIES = ("auto",) + STRATEGIES
# astra.textgen: the strategies text generation supports (``astra generate``)
GENERATE_STRATEGIES = ("auto", "single", "sp", "astra")

# ------------------------------------------------------------------------------ calibration

# astra.calibrate.Method's defaults
DISTILL_LR = 2e-3       # Adam learning rate of the codebook distillation
LAYER_LR = 1e-3         # Adam learning rate of the layer-local codebook training
REFINE_PASSES = 5       # joint refinement passes of residual stages (refine_stages)
KMEANS_ITERS = 12       # Lloyd iterations per k-means
KMEANS_MAX_POINTS = 32768  # k-means points per layer (a random subset)
KMEANS_INIT = "sampled"
# astra.evaluate_llm / astra.catalog.llm: causal LLMs' codebooks (the same cached ones)
LLM_CALIB_ITERS = 8
QUANTIZE_TARGETS = ("x", "kv")  # what codebooks quantize: X or [k; v] (astra.codebooks)
LLM_QUANTIZE = "kv"     # causal LLMs: [k; v] (+9.2% ppl against X's +11.1%, SmolLM2 N=4)
LLM_STAGES = (64,)      # causal LLMs at G=1: a refined residual stage (16 bits: +8.3%)
DECODE_WEIGHTS = ("fp32", "int8")  # the weights a decode step reads (astra.decode)
GENERATE_WEIGHTS = "int8"  # generate / demo / bench e2e: a quarter of fp32's bytes per token
INT8_GROUP = 32         # int8 decode weights: one scale per 32 weights of a row (the
                        # GGUF block; per-row scales: KL 5x larger, bench/decode_quality.py)
GREEDY_TOKENS = 32      # greedy tokens compared per prompt (``greedy32_identical``)

# ------------------------------------------------------------------------------ fine-tuning

# astra.finetune.FinetuneConfig's defaults
CODEBOOK_UPDATES = ("grad", "ema")
CODEBOOK_UPDATE = "grad"
CODEBOOK_LR = 1e-3      # AdamW learning rate of the codebooks
NAQ_NOISE = 0.3         # NAQ strength λ
COMMITMENT = 2.5e-4     # β of the commitment loss
