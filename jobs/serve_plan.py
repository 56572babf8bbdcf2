"""What a serverless worker for a base model needs: GPU pools that hold it and its disk.

GPU pools and their flex prices: runpod/docs references/gpu-types.mdx ("GPU pools") and
snippets/serverless-gpu-pricing-table.mdx (USD per second). A pool fits a model when its
memory times GPU_MEMORY_UTILIZATION (the share vLLM may take; sent to worker-vllm as
GPU_MEMORY_UTILIZATION) holds `SupportedModel.serve_gpu_gb()` (16-bit weights + KV cache):
a 7-8B model in 16-bit does not fit a 24 GB card that way, so it gets the 48 GB pools.
The POOLS_ASKED cheapest fitting pools are asked for, cheapest first (a second pool only
for availability; the cost per 1k requests is priced on the first).

Container disk: `SupportedModel.serve_disk_gb()`. worker-vllm keeps its Hugging Face
cache under BASE_PATH=/runpod-volume (its Dockerfile), which is the container disk when
no network volume is attached, so the whole 16-bit model lands there.

A model the catalog does not know gets the 80 GB pools and a 150 GB disk (the container
disk worker-vllm's own hub listing uses, .runpod/hub.json), never a guess that may not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs import catalog

GPU_MEMORY_UTILIZATION = 0.90
POOLS_ASKED = 2
UNKNOWN_MODEL_GPU_IDS = "AMPERE_80,ADA_80_PRO"
UNKNOWN_MODEL_DISK_GB = 150

# (pool id, GPU memory GB, flex worker USD per second), cheapest first.
POOLS: tuple[tuple[str, int, float], ...] = (
    ("AMPERE_16", 16, 0.00016),
    ("AMPERE_24", 24, 0.00019),
    ("ADA_24", 24, 0.00031),
    ("AMPERE_48", 48, 0.00034),
    ("ADA_48_PRO", 48, 0.00053),
    ("AMPERE_80", 80, 0.00076),
    ("ADA_80_PRO", 80, 0.00116),
    ("HOPPER_141", 141, 0.00155),
)
SERVERLESS_PRICE_PER_S: dict[str, float] = {pool: usd for pool, _, usd in POOLS}
POOL_MEMORY_GB: dict[str, int] = {pool: gb for pool, gb, _ in POOLS}


@dataclass(frozen=True)
class ServePlan:
    gpu_ids: str  # comma-separated RunPod GPU pool ids, first = priced
    disk_gb: int  # worker container disk
    known: bool  # the base model is in jobs.catalog

    @property
    def first_pool(self) -> str:
        return self.gpu_ids.split(",")[0].strip()


def fitting_pools(need_gb: float, utilization: float = GPU_MEMORY_UTILIZATION) -> list[str]:
    """Pool ids whose usable memory holds `need_gb`, cheapest first."""
    ordered = sorted(POOLS, key=lambda p: p[2])
    return [pool for pool, gb, _ in ordered if gb * utilization >= need_gb]


def plan_for(base_model: str | None) -> ServePlan:
    """GPU pools and container disk for serving `base_model`'s merged 16-bit weights."""
    model = catalog.lookup(base_model or "")
    if model is None:
        return ServePlan(UNKNOWN_MODEL_GPU_IDS, UNKNOWN_MODEL_DISK_GB, known=False)
    pools = fitting_pools(model.serve_gpu_gb())[:POOLS_ASKED] or [POOLS[-1][0]]
    return ServePlan(",".join(pools), model.serve_disk_gb(), known=True)


def price_per_s(gpu_ids: str) -> float:
    """Flex USD/s of the first pool in `gpu_ids` (the dearest pool's when unknown: never
    an understatement)."""
    pool = gpu_ids.split(",")[0].strip()
    return SERVERLESS_PRICE_PER_S.get(pool, max(SERVERLESS_PRICE_PER_S.values()))
