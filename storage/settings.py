"""The one object that reads environment variables."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Slack
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None  # Socket Mode (xapp-...)
    slack_signing_secret: SecretStr | None = None  # HTTP mode
    tuner_slack_api_url: str = "https://slack.com/api/"
    tuner_http_port: int = 3000

    # Anthropic (ANTHROPIC_BASE_URL is read by the SDK itself)
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    tuner_claude_model: str = "claude-sonnet-4-6"
    tuner_judge_model: str = "claude-sonnet-4-6"
    tuner_generation_concurrency: int = 8

    # RunPod (RUNPOD_API_BASE_URL / RUNPOD_ENDPOINT_BASE_URL are SDK-native)
    runpod_api_key: SecretStr | None = None
    runpod_api_base_url: str | None = None
    runpod_endpoint_base_url: str | None = None
    tuner_pod_url_template: str = "https://{pod_id}-{port}.proxy.runpod.net"
    # Official prebuilt unsloth image, lean `core` variant (torch 2.11 + CUDA 12.8, unsloth,
    # trl, peft, bitsandbytes, prebuilt llama.cpp; no Studio web app on port 8000, which is our
    # control port). Pinned: a dated pin tag plus its digest (published with that digest in a
    # public RunPod launcher script); unsloth prunes dated pins after 60 days, the digest keeps
    # pulling the same image. Needs a host driver >= 570.26 (CUDA 12.8; docker/DOCKERHUB.md).
    tuner_pod_image: str = (
        "unsloth/unsloth:core-nightly-2026.09.19"
        "@sha256:d081bd90a17ed224e93117f87d0eeba98af49a045f62331da7a3038e5f082d00"
    )
    # empty: the cheapest GPU class that fits the spec's base model (jobs/catalog.py);
    # a comma-separated list of RunPod GPU ids overrides it for every run
    tuner_gpu_types: str = ""
    # host CUDA versions a training pod may land on; empty: every RunPod version >= the
    # image's CUDA (jobs/catalog.py cuda_versions_for_image)
    tuner_pod_cuda_versions: str = ""
    # wall-clock cap per run: the estimate x this factor, never more than the hard cap
    tuner_run_cap_factor: float = Field(default=2.0, ge=1.0)
    tuner_max_run_hours: float = Field(default=6.0, gt=0)
    # also export a GGUF (llama.cpp q4_k_m) to the run's Hub repo (a spec can ask for it too)
    tuner_gguf: bool = False
    tuner_cloud_types: str = "SECURE,COMMUNITY"
    tuner_reaper_interval_s: int = 300
    tuner_poll_interval_s: float = 10.0
    tuner_pod_ready_timeout_s: float = 900.0
    # how long a pod's proxy may fail (Cloudflare 520/522/524, 502-504, 404, resets,
    # timeouts) before the run counts as crashed and its pod is terminated
    tuner_pod_unreachable_grace_s: float = Field(default=600.0, gt=0)
    # RunPod API transient failures (429, 5xx, HTML pages, resets, internal errors):
    # tries per call and the exponential backoff between them (a 429's Retry-After wins)
    tuner_runpod_attempts: int = Field(default=5, ge=1)
    tuner_runpod_backoff_s: float = Field(default=1.0, ge=0)
    tuner_runpod_backoff_max_s: float = Field(default=60.0, ge=0)
    # a finished (or never started) pod that hears nothing from the bot this long removes
    # itself with the pod-scoped runpodctl key: a dead bot can't keep a GPU billing
    tuner_pod_idle_timeout_s: int = 3600
    # worker-vllm v2.25.2 (vLLM 0.27.1; runpod-workers/worker-vllm release tag, pushed as
    # runpod/worker-v1-vllm:<tag>). Its hub listing runs it on CUDA 13.0 hosts only
    # (.runpod/hub.json allowedCudaVersions), so endpoints ask for those ("" = any host).
    tuner_vllm_image: str = "runpod/worker-v1-vllm:v2.25.2"
    tuner_vllm_cuda_versions: str = "13.0"
    # comma-separated serverless GPU pool ids; empty = the cheapest pools that hold the model
    tuner_serverless_gpu_ids: str = ""
    # how long a deleted endpoint's template is retried in the background before the
    # reaper takes over (RunPod refuses it for up to ~2 minutes)
    tuner_template_retry_s: float = 300.0
    # JSON object merged into the pod TrainConfig (e.g. {"max_steps": 200}); tests use
    # {"tiny_random_model": true} so the pod program trains a tiny local model on CPU.
    tuner_train_overrides: str = ""
    hf_token: SecretStr | None = None
    tuner_hf_namespace: str | None = None

    # Storage
    database_url: str = "sqlite:///tuner.db"

    # Policy
    tuner_allowed_users: str = ""  # comma-separated Slack user ids; empty = everyone
    tuner_allowed_channels: str = ""  # comma-separated channel ids; empty = everywhere
    tuner_project_budget_usd: float = 50.0
    tuner_default_examples: int = Field(default=1000, ge=1)
    tuner_max_import_mb: int = Field(default=20, ge=1)  # largest file imported from a thread
    tuner_promotion_threshold: float = 0.5
    tuner_nightly_hour_utc: int = 3
    tuner_nightly_min_new_examples: int = 50

    @staticmethod
    def _csv(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]

    @property
    def allowed_users(self) -> list[str]:
        return self._csv(self.tuner_allowed_users)

    @property
    def allowed_channels(self) -> list[str]:
        return self._csv(self.tuner_allowed_channels)

    @property
    def gpu_types(self) -> list[str]:
        return self._csv(self.tuner_gpu_types)

    @property
    def pod_cuda_versions(self) -> list[str]:
        return self._csv(self.tuner_pod_cuda_versions)

    @property
    def cloud_types(self) -> list[str]:
        return self._csv(self.tuner_cloud_types)

    @property
    def train_overrides(self) -> dict[str, object]:
        import json

        if not self.tuner_train_overrides.strip():
            return {}
        value = json.loads(self.tuner_train_overrides)
        if not isinstance(value, dict):
            raise ValueError("TUNER_TRAIN_OVERRIDES must be a JSON object")
        return value

    def user_allowed(self, user_id: str) -> bool:
        return not self.allowed_users or user_id in self.allowed_users


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
