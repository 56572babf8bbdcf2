"""Supported base models: the facts that size a run (GPU memory, disks) and its estimate.

A spec may only name a model listed here: an unknown id is refused at the spec step with
this list, because every figure below (which GPUs to try, how big the pod's and the
serverless worker's disks must be, how long training takes) is derived from it.

Disk formulas (GB, decimal, rounded up to a multiple of 5):
- pod (training container disk): the 4-bit base download (~0.7 bytes/param), the 16-bit
  base that `save_pretrained_merged` downloads again to dequantize (2 bytes/param), the
  merged 16-bit output (2 bytes/param), plus, with GGUF, an f16 GGUF intermediate
  (2 bytes/param) and the q4_k_m file (~0.6 bytes/param); x1.2 headroom, + 20 GB for
  checkpoints, pip/HF caches and the image's writable layer. unsloth's hub pre-warm is
  switched off on the pod (UNSLOTH_PREWARM_HUB_CACHE=0), else the 16-bit base lands twice.
- serverless worker (worker-vllm container disk): the merged 16-bit weights (2 bytes/param)
  x1.2 + 15 GB for vLLM's caches (torch.compile, CUDA graphs) and the writable layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SupportedModel:
    id: str  # Hugging Face repo id
    params_b: float  # parameters, billions
    family: str  # chat-template family (llama-3, qwen-2.5, gemma-3, mistral, phi-4)
    train_gpu_gb: float  # GPU memory a QLoRA run needs (seq 2048, batch 8, grad checkpointing)

    def pod_disk_gb(self, *, gguf: bool = False) -> int:
        per_param = 0.7 + 2.0 + 2.0 + ((2.0 + 0.6) if gguf else 0.0)
        return _round5(self.params_b * per_param * 1.2 + 20)

    def serve_disk_gb(self) -> int:
        return _round5(self.params_b * 2.0 * 1.2 + 15)

    def serve_gpu_gb(self) -> float:
        """16-bit weights + ~30% for vLLM's KV cache at a 4k context."""
        return self.params_b * 2.0 * 1.3 + 2


def _round5(gb: float) -> int:
    return int(5 * math.ceil(gb / 5))


SUPPORTED: tuple[SupportedModel, ...] = (
    SupportedModel("unsloth/Llama-3.2-1B-Instruct", 1.24, "llama-3", 8),
    SupportedModel("unsloth/Llama-3.2-3B-Instruct", 3.21, "llama-3", 12),
    SupportedModel("unsloth/Meta-Llama-3.1-8B-Instruct", 8.03, "llama-3", 22),
    SupportedModel("unsloth/Qwen2.5-0.5B-Instruct", 0.49, "qwen-2.5", 6),
    SupportedModel("unsloth/Qwen2.5-1.5B-Instruct", 1.54, "qwen-2.5", 8),
    SupportedModel("unsloth/Qwen2.5-3B-Instruct", 3.09, "qwen-2.5", 12),
    SupportedModel("unsloth/Qwen2.5-7B-Instruct", 7.62, "qwen-2.5", 20),
    SupportedModel("unsloth/gemma-3-1b-it", 1.0, "gemma-3", 8),
    SupportedModel("unsloth/gemma-3-4b-it", 4.3, "gemma-3", 14),
    SupportedModel("unsloth/mistral-7b-instruct-v0.3", 7.25, "mistral", 20),
    SupportedModel("unsloth/Phi-4-mini-instruct", 3.84, "phi-4", 14),
)
_BY_ID = {m.id.lower(): m for m in SUPPORTED}


def lookup(model_id: str) -> SupportedModel | None:
    """The supported model with this id (case-insensitive), or None."""
    return _BY_ID.get((model_id or "").strip().lower())


def supported_ids() -> list[str]:
    return [m.id for m in SUPPORTED]
