"""GPU smoke test of the pod program's real training path, for a CUDA machine without internet.

    python bench/gpu_smoke.py [--steps 120] [--workdir DIR]

Builds a small Llama-architecture model and a byte-level BPE tokenizer locally (no hub), saves
them to a directory so the real load path (from_pretrained of a local path) runs, then drives
the same functions the pod uses (jobs/train.py: check_cuda, probe_plan, load_model, train_model,
generate, save_adapter, merge_16bit): unsloth when it imports, else transformers + bitsandbytes
4-bit. Checks that eval loss falls, the best checkpoint is the one kept, the adapter is saved,
the merged 16-bit save loads and generates, and batched generation returns every prompt; prints
timings. Budget: well under 8 minutes. Without usable CUDA it prints one line and exits 0.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_k, _v)  # no internet: never wait on the hub

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import train as pod
from jobs.podproto import JobRequest

BUDGET_S = 8 * 60


def reverse_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """A learnable chat task: reverse a short list of letters."""
    rows = []
    for _ in range(n):
        words = [rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))]
        rows.append({"messages": [
            {"role": "system", "content": "You reverse lists."},
            {"role": "user", "content": "reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def smoke_job(base_dir: Path, steps: int, seed: int = 0) -> JobRequest:
    rng = random.Random(seed)
    train, val = reverse_rows(512, rng), reverse_rows(48, rng)
    prompts = [{"id": f"p{i}", "messages": r["messages"][:-1]} for i, r in enumerate(reverse_rows(10, rng))]
    config = {
        "job_id": "gpu-smoke", "base_model": str(base_dir), "require_cuda": True, "load_in_4bit": True,
        "max_seq_len": 96, "batch_size": 16, "learning_rate": 2e-3, "max_steps": steps,
        "eval_steps": max(1, steps // 6), "early_stopping_patience": 0, "warmup_ratio": 0.05,
        "max_new_tokens": 16, "gen_batch_size": 4, "seed": seed,
    }
    return JobRequest.model_validate({"config": config, "train": train, "val": val, "eval_prompts": prompts})


def build_local_model(out_dir: Path, texts: list[str], *, hidden: int = 256, layers: int = 4, seed: int = 0) -> None:
    """A random Llama (dims multiples of 64, as 4-bit blocks need) + BPE tokenizer, saved like a hub model."""
    tokenizer = pod.build_tiny_tokenizer(texts, vocab_size=512)
    model = pod.build_tiny_llama(tokenizer, seed=seed, max_len=128, hidden=hidden, layers=layers, heads=4)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


class Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps.append((name, now - self.last))
        self.last = now

    def report(self) -> None:
        for name, s in self.laps:
            print(f"  {name:<28} {s:7.1f} s")
        print(f"  {'total':<28} {time.monotonic() - self.t0:7.1f} s (budget {BUDGET_S} s)")


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    if not ok:
        failures.append(what)


def load_merged(merged_dir: Path, plan: pod.Plan, job: JobRequest) -> tuple[str, int]:
    """Load the merged 16-bit save with plain transformers (what worker-vllm would read) and generate;
    returns the text and how many LoRA parameters the loaded model still has (must be 0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=pod._torch_dtype(plan.dtype))
    model = model.to("cuda")
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    enc = tok(pod.render_prompt(tok, job.eval_prompts[0].messages), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc.to("cuda"), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    lora = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    return str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)), lora


def run(steps: int, workdir: Path) -> int:
    clock, failures = Clock(), list[str]()
    base_dir = workdir / "base-model"
    job = smoke_job(base_dir, steps)
    build_local_model(base_dir, pod.job_texts(job))
    clock.lap("build + save local model")
    cfg = job.config
    pod.check_cuda(cfg)
    plan = pod.probe_plan(cfg)
    print(f"plan: backend={plan.backend} dtype={plan.dtype} load_in_4bit={plan.load_in_4bit}")
    state = pod.JobState(workdir / "job", secrets=[])
    model, tokenizer = pod.load_model(job, plan, None)
    clock.lap("load (from_pretrained, local)")
    trained = pod.train_model(job, state, model, tokenizer, plan)
    clock.lap(f"train {state.snapshot().step} steps")
    p = state.snapshot()
    losses = [loss for _, loss in p.eval_loss]
    print(f"eval loss: {[round(x, 3) for x in losses]} (best {p.best_eval_loss} at step {p.best_step})")
    check(len(losses) >= 2 and losses[-1] < losses[0] * 0.95, "eval loss falls", failures)
    check(len(losses) <= pod.MAX_EVALS, f"at most {pod.MAX_EVALS} evals during training ({len(losses)})", failures)
    final = state.final_eval_loss
    check(final is not None and p.best_eval_loss is not None and abs(final - p.best_eval_loss) < 5e-3 * max(1, final),
          f"best checkpoint kept (re-evaluated {final} vs best {p.best_eval_loss})", failures)
    gens = pod.generate(job, trained.model, tokenizer, plan)
    clock.lap(f"generate {len(gens)} prompts, batches of {cfg.gen_batch_size}")
    check([g.id for g in gens] == [q.id for q in job.eval_prompts], "batched generation answers every prompt",
          failures)
    print(f"sample: {job.eval_prompts[0].messages[-1]['content']!r} -> {gens[0].output!r}")
    adapter_dir = pod.save_adapter(state, trained.model, tokenizer)
    check((adapter_dir / "adapter_config.json").is_file() and any(adapter_dir.glob("adapter_model.*")),
          "adapter saved", failures)
    clock.lap("save adapter")
    method = pod.merge_method(cfg, plan)
    assert method is not None
    merged_dir = workdir / "merged"
    pod.merge_16bit(method, cfg, plan, trained.model, tokenizer, adapter_dir, merged_dir, None)
    clock.lap(f"merge to 16 bit ({method})")
    text, lora = load_merged(merged_dir, plan, job)
    check(lora == 0, f"merged 16-bit save loads as a plain model and generates ({text!r})", failures)
    clock.lap("load merged + generate")
    clock.report()
    check(time.monotonic() - clock.t0 < BUDGET_S, "within the time budget", failures)
    print("gpu_smoke: OK" if not failures else f"gpu_smoke: {len(failures)} check(s) failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    problem = pod.cuda_problem(pod.probe_cuda_facts())
    if problem:
        print(f"gpu_smoke: skipped, no usable CUDA here ({problem})")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return run(args.steps, workdir)


if __name__ == "__main__":
    sys.exit(main())
