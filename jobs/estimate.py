"""How long a training run takes on a pod, phase by phase, and what it bills.

One pure function, `estimate_run`, used by the launch card (TrainingService.estimate),
the run's wall-clock cap and bench/bench_estimate.py, so the three never disagree.

Formula (seconds; N = model parameters, tok = tokens):

  tokens     a row is (system + prompt + response characters) / CHARS_PER_TOKEN plus the
             chat template's own tokens (TEMPLATE_TOKENS, per family), cut at max_seq_len.
  padding    rows are batched in random order and each batch is padded to its longest
             row (DataCollatorForSeq2Seq, no packing): a batch of b rows costs
             b x E[max of b lengths], from the dataset's own lengths (exact order
             statistics of a random batch drawn without replacement).
  steps      per epoch max(ceil(rows / batch) // grad_accum, 1), times epochs, rounded up
             (how transformers' Trainer counts them); max_steps wins when set.
  train      padded train tokens x 6 N / (mfu x peak BF16 FLOP/s) + STEP_OVERHEAD_S per
             micro-batch (catalog.GpuSpec documents 6 N, mfu and peak, with sources).
  evals      n_evals full passes over the validation rows: forward only, 2 N FLOPs per
             padded token at the same utilisation, + EVAL_BATCH_OVERHEAD_S per batch.
             n_evals = the planned evaluations (plan_eval_steps) + the final one.
  generate   held-out prompts in batches of gen_batch_size; a batch decodes until its
             longest answer ends: E[max] of the expected answer lengths (reference
             length x GEN_LENGTH_FACTOR, capped at max_new_tokens) decode steps, each
             reading the 4-bit weights once (N x BYTES_4BIT / (bandwidth x
             DECODE_BW_EFFICIENCY)) + DECODE_STEP_OVERHEAD_S.
  boot/load  POD_BOOT_S (schedule + pull the image + start) and the 4-bit base download
             (N x BYTES_4BIT_DOWNLOAD at HF_DOWNLOAD_MBS) + MODEL_LOAD_S.
  export     adapter save; with a Hub push also the 16-bit merge (download of the 16-bit
             base, 2 N bytes at HF_DOWNLOAD_MBS, write at DISK_WRITE_MBS) and its upload
             (2 N at HF_UPLOAD_MBS); with GGUF the f16 + q4_k_m conversion and upload.
  teardown   TEARDOWN_S: the bot's next poll, the adapter download, the terminate call.

Network and boot figures are assumptions (harsh readings), not measurements: RunPod
publishes no pull or Hub throughput. The useful fraction (train / total) is what
bench/bench_estimate.py prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.catalog import GpuSpec, SupportedModel

CHARS_PER_TOKEN = 4.0  # English text with Llama-3/Qwen-2.5 style BPE vocabularies
# Template tokens per row, counted from each family's chat template: role headers,
# turn ends, BOS; Llama 3.1/3.2 also add "Cutting Knowledge Date: ... Today Date: ..."
# to the system turn (~20 tokens); Qwen 2.5 inserts its default system prompt when the
# row has none (~20 tokens); Gemma 3 folds the system prompt into the first user turn.
TEMPLATE_TOKENS: dict[str, int] = {
    "llama-3": 36, "qwen-2.5": 16, "gemma-3": 12, "mistral": 10, "phi-4": 8,
}
DEFAULT_TEMPLATE_TOKENS = 36  # unknown family: the largest

STEP_OVERHEAD_S = 0.10  # per micro-batch: kernel launches, optimizer, dataloader (assumed)
EVAL_BATCH_OVERHEAD_S = 0.03
MAX_EVALS = 10  # evaluations during training, plus the final one
MIN_EVALS = 3
EVAL_BUDGET = 0.10  # intermediate evaluations may cost at most this share of training

BYTES_4BIT = 0.56  # NF4 weight + its scales, per parameter, read once per decode step
DECODE_BW_EFFICIENCY = 0.5  # share of the datasheet bandwidth a decode step reaches
DECODE_STEP_OVERHEAD_S = 0.025  # python/generate() overhead per decode step (assumed)
GEN_LENGTH_FACTOR = 1.25  # the fine-tuned model's answers vs the reference answers

POD_BOOT_S = 300.0  # schedule + pull/extract a ~10 GB CUDA image + start (assumed)
BYTES_4BIT_DOWNLOAD = 0.7  # unsloth's bnb-4bit repos (embeddings stay 16-bit)
HF_DOWNLOAD_MBS = 150.0  # Hub -> pod, MB/s (assumed)
HF_UPLOAD_MBS = 60.0  # pod -> Hub, MB/s (assumed)
DISK_WRITE_MBS = 800.0
MODEL_LOAD_S = 45.0  # import unsloth, build the 4-bit model, attach LoRA (assumed)
GGUF_QUANT_S_PER_B = 12.0  # llama.cpp q4_k_m quantize, seconds per billion params
ADAPTER_SAVE_S = 10.0
TEARDOWN_S = 20.0


@dataclass(frozen=True)
class Workload:
    """What one run trains on and how (token lengths already include the template)."""

    train_tokens: Sequence[int]
    val_tokens: Sequence[int]
    gen_tokens: Sequence[int]  # expected answer tokens per held-out prompt
    epochs: float = 3.0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 2048
    max_steps: int = -1
    eval_steps: int | None = None  # None: plan_eval_steps decides
    max_new_tokens: int = 1024
    gen_batch_size: int = 8
    push: bool = False  # merged 16-bit model pushed to the Hub
    gguf: bool = False


@dataclass(frozen=True)
class RunEstimate:
    steps: int
    eval_steps: int
    n_evals: int  # including the final evaluation
    padded_train_tokens: int
    boot_s: float
    load_s: float
    train_s: float  # useful: forward/backward on training tokens
    eval_s: float
    generate_s: float
    export_s: float
    teardown_s: float

    @property
    def train_phase_s(self) -> float:
        return self.train_s + self.eval_s

    @property
    def pre_train_s(self) -> float:
        return self.boot_s + self.load_s

    @property
    def post_train_s(self) -> float:
        return self.generate_s + self.export_s + self.teardown_s

    @property
    def total_s(self) -> float:
        return self.pre_train_s + self.train_phase_s + self.post_train_s

    @property
    def useful_fraction(self) -> float:
        return self.train_s / self.total_s if self.total_s else 0.0


def row_tokens(chars: int, family: str) -> int:
    """Tokens of one chat row: its text plus the family's template tokens."""
    return math.ceil(chars / CHARS_PER_TOKEN) + TEMPLATE_TOKENS.get(family, DEFAULT_TEMPLATE_TOKENS)


def expected_batch_max(lengths: Sequence[int], b: int) -> float:
    """E[max of a random batch of b rows] from `lengths` (drawn without replacement):
    with the lengths sorted, P(max <= x_i) = C(i, b) / C(n, b)."""
    if not lengths:
        return 0.0
    xs, n = sorted(lengths), len(lengths)
    b = max(1, min(b, n))

    def cdf(i: int) -> float:
        out = 1.0
        for j in range(b):
            out *= max(i - j, 0) / (n - j)
        return out

    return sum(x * (cdf(i) - cdf(i - 1)) for i, x in enumerate(xs, 1))


def padded_tokens_per_pass(lengths: Sequence[int], batch: int) -> float:
    """Tokens one pass over `lengths` processes, padding included."""
    if not lengths:
        return 0.0
    return math.ceil(len(lengths) / batch) * batch * expected_batch_max(lengths, batch)


def planned_steps(n_rows: int, *, epochs: float, batch: int, accum: int, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    per_epoch = max(math.ceil(n_rows / batch) // accum, 1)
    return max(1, math.ceil(epochs * per_epoch))


def plan_eval_steps(steps: int, *, train_pass_tokens: float, val_pass_tokens: float,
                    epochs: float) -> int:
    """eval_steps giving MIN_EVALS..MAX_EVALS evaluations, as many as EVAL_BUDGET allows:
    one eval pass costs val x 2N against train x epochs x 6N for the whole training."""
    if val_pass_tokens <= 0:
        n = MAX_EVALS
    else:
        n = math.floor(EVAL_BUDGET * 3.0 * train_pass_tokens * max(epochs, 1.0) / val_pass_tokens)
    n = max(1, min(MAX_EVALS, max(MIN_EVALS, n), steps))
    return max(1, math.ceil(steps / n))


def estimate_run(model: SupportedModel, gpu: GpuSpec, w: Workload) -> RunEstimate:
    """Every phase of one run of `model` on `gpu`; see the module docstring."""
    cut = [min(t, w.max_seq_len) for t in w.train_tokens]
    val = [min(t, w.max_seq_len) for t in w.val_tokens]
    n = model.params_b * 1e9
    flops_s = gpu.mfu * gpu.bf16_tflops * 1e12
    steps = planned_steps(len(cut), epochs=w.epochs, batch=w.batch_size, accum=w.grad_accum,
                          max_steps=w.max_steps)
    micro = steps * w.grad_accum
    per_micro = w.batch_size * expected_batch_max(cut, w.batch_size)
    padded = micro * per_micro
    train_s = padded * 6 * n / flops_s + micro * STEP_OVERHEAD_S

    val_pass = padded_tokens_per_pass(val, w.batch_size)
    epochs_done = micro * w.batch_size / max(len(cut), 1)
    eval_steps = w.eval_steps or plan_eval_steps(
        steps, train_pass_tokens=padded_tokens_per_pass(cut, w.batch_size),
        val_pass_tokens=val_pass, epochs=epochs_done)
    n_evals = steps // eval_steps + 1
    eval_batches = math.ceil(len(val) / w.batch_size)
    eval_s = n_evals * (val_pass * 2 * n / flops_s + eval_batches * EVAL_BATCH_OVERHEAD_S)

    answers = [min(w.max_new_tokens, math.ceil(t * GEN_LENGTH_FACTOR)) for t in w.gen_tokens]
    step_s = n * BYTES_4BIT / (gpu.mem_bw_gbs * 1e9 * DECODE_BW_EFFICIENCY) + DECODE_STEP_OVERHEAD_S
    batches = math.ceil(len(answers) / w.gen_batch_size)
    generate_s = batches * expected_batch_max(answers, w.gen_batch_size) * step_s

    mb = 1e6
    load_s = n * BYTES_4BIT_DOWNLOAD / (HF_DOWNLOAD_MBS * mb) + MODEL_LOAD_S
    export_s = ADAPTER_SAVE_S
    if w.push:
        export_s += 2 * n / (HF_DOWNLOAD_MBS * mb) + 2 * n / (DISK_WRITE_MBS * mb)
        export_s += 2 * n / (HF_UPLOAD_MBS * mb)
    if w.gguf:
        export_s += 2 * n / (DISK_WRITE_MBS * mb) + GGUF_QUANT_S_PER_B * model.params_b
        export_s += 0.6 * n / (HF_UPLOAD_MBS * mb)
    return RunEstimate(
        steps=steps, eval_steps=eval_steps, n_evals=n_evals, padded_train_tokens=int(padded),
        boot_s=POD_BOOT_S, load_s=load_s, train_s=train_s, eval_s=eval_s,
        generate_s=generate_s, export_s=export_s, teardown_s=TEARDOWN_S,
    )
