"""Supported base models and training GPUs: the facts that size a run and its estimate.

A spec may only name a model listed here: an unknown id is refused at the spec step with
this list, because every figure below (which GPUs to try, how big the pod's and the
serverless worker's disks must be, how long training takes) is derived from it.

Parameter counts are the safetensors totals on the Hugging Face model cards (checked
2026-12): Llama-3.2-1B 1.24B, Llama-3.2-3B 3.21B, Llama-3.1-8B 8.03B, Qwen2.5 0.49B /
1.54B / 3.09B / 7.61B, gemma-3-1b-it 1.00B, gemma-3-4b-it 4.30B (3.88B text decoder +
the 0.42B SigLIP vision tower, which is downloaded and merged too), Mistral-7B-v0.3
7.25B, Phi-4-mini 3.84B.

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
import re
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
    SupportedModel("unsloth/Qwen2.5-7B-Instruct", 7.61, "qwen-2.5", 20),
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


def supported_list_text() -> str:
    """The supported models in plain words, one per line (for Slack and the define prompt)."""
    return "\n".join(f"• `{m.id}` ({m.params_b:g}B, {m.family})" for m in SUPPORTED)


# ------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GpuSpec:
    """One RunPod GPU type (id as RunPod's gpuTypes list spells it) and its speed figures.

    - memory_gb: RunPod's GPU types reference (docs.runpod.io/references/gpu-types).
    - bf16_tflops: dense (no 2:4 sparsity) BF16 tensor-core peak from NVIDIA's datasheets:
      A40 149.7 (299.4 sparse), RTX A6000 154.8 (309.7 sparse), L40S 362 (733 sparse),
      A100 312, H100 SXM 989.4 (1,979 sparse), H100 PCIe 756 (1,513 sparse).
    - mem_bw_gbs: datasheet memory bandwidth (A40 696, A6000 768, L40S 864, A100 PCIe
      1,935, A100 SXM 2,039, H100 SXM 3,350, H100 PCIe 2,000 GB/s); it bounds decoding.
    - mfu: the fraction of bf16_tflops a QLoRA step reaches, counting 6 FLOPs per
      parameter per token (forward, the gradient-checkpointing recompute, and the
      input-gradient backward; the frozen 4-bit weights get no weight gradient). The one
      public measurement we build on: Hugging Face PEFT's method comparison
      (github.com/huggingface/peft, method_comparison/MetaMathQA/results/
      lora--llama-3.2-3B-rank32.json) trains Llama-3.2-3B with bf16 LoRA on an L40S at
      6,770 tokens/s = 4 x 3.22e9 x 6,770 = 87 TFLOPS = 24% of the dense peak. unsloth
      reports ~2x over Hugging Face QLoRA (unsloth.ai/docs/basics/unsloth-benchmarks,
      huggingface.co/blog/unsloth-trl), which we take to cancel the NF4 dequantize cost,
      so 0.24 is used for Ampere/Ada cards. Hopper gets 0.20: the same fraction of a 3x
      higher peak is optimistic for kernels that are partly memory-bound. These are
      assumptions until bench/gpu_smoke.py timings from real pods replace them.
    """

    id: str
    memory_gb: int
    bf16_tflops: float
    mem_bw_gbs: float
    mfu: float


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("NVIDIA A40", 48, 149.7, 696, 0.24),
    GpuSpec("NVIDIA RTX A6000", 48, 154.8, 768, 0.24),
    GpuSpec("NVIDIA L40S", 48, 362.0, 864, 0.24),
    GpuSpec("NVIDIA A100 80GB PCIe", 80, 312.0, 1935, 0.24),
    GpuSpec("NVIDIA A100-SXM4-80GB", 80, 312.0, 2039, 0.24),
    GpuSpec("NVIDIA H100 80GB HBM3", 80, 989.4, 3350, 0.20),
    GpuSpec("NVIDIA H100 PCIe", 80, 756.0, 2000, 0.20),
    # 24 GB cards: only used when TUNER_GPU_TYPES names them (see GPU_CLASSES).
    GpuSpec("NVIDIA RTX A5000", 24, 111.1, 768, 0.24),
    GpuSpec("NVIDIA GeForce RTX 4090", 24, 165.2, 1008, 0.24),
)
_GPU_BY_ID = {g.id: g for g in GPUS}

# GPU classes tried, smallest (cheapest per hour) first; within a class cheapest first by
# RunPod's list prices (jobs.runpod_api.FALLBACK_PRICES). The smallest class is 48 GB:
# an 8B QLoRA run at seq 2048 / batch 8 needs ~22 GB, which leaves no headroom on a 24 GB
# card, and one class for every supported model keeps runs comparable. Small models can
# still train on 24 GB cards by naming them in TUNER_GPU_TYPES.
GPU_CLASSES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (48, ("NVIDIA A40", "NVIDIA RTX A6000", "NVIDIA L40S")),
    (80, ("NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe",
          "NVIDIA H100 80GB HBM3")),
)
GPU_MEMORY_HEADROOM = 1.2  # a class fits when its memory >= train_gpu_gb x this


def gpu_spec(gpu_id: str) -> GpuSpec | None:
    return _GPU_BY_ID.get(gpu_id)


def gpu_types_for(model: SupportedModel) -> list[str]:
    """GPU types to try for this model: the cheapest class whose memory fits it."""
    need = model.train_gpu_gb * GPU_MEMORY_HEADROOM
    for memory_gb, ids in GPU_CLASSES:
        if memory_gb >= need:
            return list(ids)
    return list(GPU_CLASSES[-1][1])


# ------------------------------------------------------------------ CUDA versions
# Values RunPod accepts for a pod's allowedCudaVersions (api-reference/openapi.json in
# runpod/docs, PodCreateInput.allowedCudaVersions enum). Matching is exact: a pod is only
# placed on a host whose driver reports one of the listed versions.
RUNPOD_CUDA_VERSIONS: tuple[str, ...] = (
    "11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.7", "12.8",
    "12.9", "13.0",
)
# The official unsloth image carries torch built for CUDA 12.8 (unslothai/unsloth
# docker/DOCKERHUB.md: "PyTorch 2.11 with CUDA 12.8"), so its host driver must support
# CUDA >= 12.8. An image whose tag names no CUDA version gets this floor too.
DEFAULT_IMAGE_CUDA = "12.8"


def _ver(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(minor)


def cuda_versions_for_image(image: str, override: list[str] | None = None) -> list[str]:
    """Host CUDA versions a pod running `image` may land on: `override` when given (each
    must be one RunPod knows), else every RunPod version >= the image's CUDA (read from a
    `cudaX.Y` in its tag, else DEFAULT_IMAGE_CUDA)."""
    if override:
        unknown = [v for v in override if v not in RUNPOD_CUDA_VERSIONS]
        if unknown:
            raise ValueError(
                f"TUNER_POD_CUDA_VERSIONS has {', '.join(unknown)}; RunPod knows "
                + ", ".join(RUNPOD_CUDA_VERSIONS)
            )
        return list(override)
    m = re.search(r"cuda[-_]?(\d+)\.(\d+)", image.split(":", 1)[-1] if ":" in image else "")
    floor = _ver(f"{m.group(1)}.{m.group(2)}") if m else _ver(DEFAULT_IMAGE_CUDA)
    return [v for v in RUNPOD_CUDA_VERSIONS if _ver(v) >= floor]
