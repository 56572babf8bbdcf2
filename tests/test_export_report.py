"""Export outcomes in plain words: at run end (notes) and at Deploy (no model on the Hub)."""

from __future__ import annotations

import pytest

from jobs.deploy import DeployError, model_ref_for
from jobs.export_report import export_notes, model_on_hub, no_model_reason
from jobs.podproto import ADAPTER_ARTIFACT, ExportReport, Results
from storage.models import Run
from storage.settings import Settings

HUB = Settings(_env_file=None, hf_token="hf_x" * 8, tuner_hf_namespace="acme")
NO_HUB = Settings(_env_file=None)


def results(**export: object) -> Results:
    return Results(job_id="run-1", state="succeeded", best_step=10, best_eval_loss=0.7,
                   artifacts=[ADAPTER_ARTIFACT], hf_repo=export.pop("hf_repo", None),
                   export=ExportReport(adapter=True, **export))  # type: ignore[arg-type]


def notes(r: Results, *, hub: bool = True, gguf: bool = False) -> str:
    return " ".join(export_notes(r, hub_configured=hub, namespace="acme", gguf_asked=gguf))


def test_adapter_only_repo_is_not_a_model_on_the_hub():
    # an older pod names the repo although only the adapter went up: not deployable
    adapter_only = results(hf_repo="acme/r1", adapter_pushed=True)
    assert model_on_hub(adapter_only) is None
    assert "no merged model" in notes(adapter_only)
    assert model_on_hub(results(hf_repo="acme/r1", merged=True, pushed=True)) == "acme/r1"
    assert "Model pushed to the Hugging Face Hub: `acme/r1`" in notes(
        results(hf_repo="acme/r1", merged=True, pushed=True))


def test_merge_failure_is_explained_with_its_fix():
    r = results(merged_error="OSError: [Errno 28] No space left on device")
    text = notes(r)
    assert "16-bit merged model could not be built" in text and "No space left" in text
    assert "disk filled up" in text and "adapter was kept" in text
    deploy = no_model_reason({"export": r.export.model_dump()}, hub_configured=True, namespace="acme")
    assert "merge failed on the pod" in deploy and "set HF_TOKEN" not in deploy


@pytest.mark.parametrize(("error", "fix"), [
    ("HfHubHTTPError: 403 Forbidden: you don't have the rights to create a model under acme",
     "write scope"),
    ("OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/repos/create",
     "could not reach huggingface.co"),
])
def test_push_failure_says_what_to_fix(error: str, fix: str):
    r = results(push_error=error, merged=True)
    assert "Pushing the model to the Hugging Face Hub failed" in notes(r) and fix in notes(r)
    deploy = no_model_reason({"export": r.export.model_dump()}, hub_configured=True, namespace="acme")
    assert "push to the Hub failed" in deploy and fix in deploy


def test_a_push_the_pod_never_tried_is_not_called_a_token_problem():
    r = results(push_error="not pushed: save_merged is off, so there is no servable model")
    text = notes(r)
    assert "was not pushed" in text and "save_merged" in text and "HF_TOKEN" not in text
    deploy = no_model_reason({"export": r.export.model_dump()}, hub_configured=True, namespace="acme")
    assert "save_merged" in deploy and "HF_TOKEN" not in deploy and "failed" not in deploy


def test_no_hub_configured_and_gguf_notes():
    assert "HF_TOKEN and TUNER_HF_NAMESPACE are not both set" in notes(results(), hub=False)
    assert "GGUF export failed: no llama.cpp" in notes(results(gguf_error="no llama.cpp"), gguf=True)
    ok = results(hf_repo="acme/r1", merged=True, pushed=True, gguf_files=["x/model-q4_k_m.gguf"])
    assert "`model-q4_k_m.gguf`" in notes(ok, gguf=True)


def test_deploy_never_suggests_setting_what_is_already_set():
    run = Run(id=3, project_id=1, status="succeeded", artifact_uri="/art/run_3", config={})
    with pytest.raises(DeployError) as configured:
        model_ref_for(run, HUB)
    assert "set HF_TOKEN" not in str(configured.value) and "Retrain to push it" in str(configured.value)
    with pytest.raises(DeployError) as unconfigured:
        model_ref_for(run, NO_HUB)
    assert "set HF_TOKEN and TUNER_HF_NAMESPACE" in str(unconfigured.value)
