"""What happened to a run's exports (merge, Hub push, GGUF), in plain words with the fix.

Used twice with the same wording: when training ends (TrainingService._finish posts the
notes in the thread) and when Deploy finds no model on the Hub (jobs.deploy). A repo only
counts as holding a model when the pod reports the merged 16-bit weights pushed
(`ExportReport.pushed`); an adapter-only upload never does.
"""

from __future__ import annotations

from typing import Any

from jobs.podproto import ADAPTER_ARTIFACT, ExportReport, Results

_DISK = ("no space left", "disk quota", "errno 28", "not enough disk")
_MEMORY = ("out of memory", "cuda oom", "outofmemory", "cannot allocate memory")
_AUTH = ("401", "403", "unauthorized", "forbidden", "permission", "invalid token",
         "invalid user token", "not authorized", "write access")
_NETWORK = ("offline", "connection", "timed out", "timeout", "name resolution",
            "temporarily unavailable", "502", "503", "504")


def _has(text: str, words: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(w in low for w in words)


def report_of(results: Results) -> ExportReport:
    """The pod's ExportReport, completed from older pods' `extra` keys."""
    rep = results.export.model_copy(deep=True)
    extra = results.extra or {}
    rep.adapter = rep.adapter or ADAPTER_ARTIFACT in results.artifacts
    rep.merged = rep.merged or bool(extra.get("merged_dir"))
    rep.merged_error = rep.merged_error or extra.get("merged_error")
    rep.push_error = rep.push_error or extra.get("hf_error")
    rep.gguf_error = rep.gguf_error or extra.get("gguf_error")
    if not rep.gguf_files and extra.get("gguf_files"):
        rep.gguf_files = list(extra["gguf_files"])
    return rep


def model_on_hub(results: Results) -> str | None:
    """The Hub repo that holds a loadable (merged) model, or None."""
    return results.hf_repo if results.hf_repo and report_of(results).pushed else None


def merge_fix(error: str) -> str:
    if _has(error, _DISK):
        return ("The pod's disk filled up: tuner sizes it from its model table "
                "(jobs/catalog.py), so this is a tuner bug worth reporting. Retrain to try again.")
    if _has(error, _MEMORY):
        return "The pod ran out of memory while merging. Retrain to try again."
    return "Retrain to try again; if it fails the same way, report the error."


NOT_PUSHED = "not pushed:"  # the pod did not try to push (jobs/train.py export_outputs)


def skipped_push_fix(error: str) -> str:
    """What to do when the pod did not even try to push, by its reason."""
    if "save_merged" in error:
        return ("The 16-bit merge is switched off (save_merged: false, e.g. in "
                "TUNER_TRAIN_OVERRIDES), so nothing deployable was built: remove that and retrain.")
    if "HF_TOKEN" in error:
        return "The pod had no HF_TOKEN: set HF_TOKEN for the bot and retrain."
    if "hf_repo" in error:
        return "Set HF_TOKEN and TUNER_HF_NAMESPACE and retrain."
    return "Retrain to push it."


def push_fix(error: str, namespace: str | None) -> str:
    if error.lower().startswith(NOT_PUSHED):
        return skipped_push_fix(error)
    ns = f"`{namespace}`" if namespace else "TUNER_HF_NAMESPACE"
    if _has(error, _AUTH):
        return (f"HF_TOKEN must be allowed to create and write repos in {ns} (a token with "
                "write scope for that user or organization). Fix it and retrain.")
    if _has(error, _NETWORK):
        return "The pod could not reach huggingface.co. Retrain to try again."
    return f"Check that HF_TOKEN has write access to {ns}, then retrain."


def export_notes(results: Results, *, hub_configured: bool, namespace: str | None,
                 gguf_asked: bool) -> list[str]:
    """Lines for the thread when training ends."""
    rep, out = report_of(results), []
    repo = model_on_hub(results)
    kept = " The LoRA adapter was kept, so the model can still be judged." if rep.adapter else ""
    if rep.merged_error:
        out.append("The 16-bit merged model could not be built on the pod "
                   f"({rep.merged_error}), so no deployable model reached the Hub. "
                   + merge_fix(rep.merged_error) + kept)
    elif rep.push_error and rep.push_error.lower().startswith(NOT_PUSHED):
        out.append(f"The model was not pushed to the Hugging Face Hub ({rep.push_error}), so "
                   "Deploy has nothing to serve. " + skipped_push_fix(rep.push_error) + kept)
    elif rep.push_error:
        out.append(f"Pushing the model to the Hugging Face Hub failed ({rep.push_error}), so "
                   "Deploy has nothing to serve. " + push_fix(rep.push_error, namespace) + kept)
    elif repo:
        out.append(f"Model pushed to the Hugging Face Hub: `{repo}`.")
    elif not hub_configured:
        out.append("The model was not pushed to the Hugging Face Hub (HF_TOKEN and "
                   "TUNER_HF_NAMESPACE are not both set): it can be judged but not deployed.")
    else:
        out.append("The pod reported no merged model on the Hub, so Deploy has nothing to "
                   "serve. Retrain to push it." + kept)
    if gguf_asked and rep.gguf_error:
        out.append(f"GGUF export failed: {rep.gguf_error}.")
    elif rep.gguf_files:
        out.append("GGUF uploaded to the same repo: " + ", ".join(f"`{f.rsplit('/', 1)[-1]}`"
                                                                  for f in rep.gguf_files))
    return out


def no_model_reason(config: dict[str, Any], *, hub_configured: bool, namespace: str | None) -> str:
    """Why a run has no model on the Hub, and what to do (for Deploy)."""
    rep = ExportReport.model_validate(config.get("export") or {})
    push_error = rep.push_error or config.get("hf_error")
    if rep.merged_error:
        return ("The 16-bit merge failed on the pod "
                f"({rep.merged_error}), so nothing deployable was pushed. {merge_fix(rep.merged_error)}"
                " Then deploy again.")
    if push_error and str(push_error).lower().startswith(NOT_PUSHED):
        return (f"The pod did not push a model ({push_error}). "
                f"{skipped_push_fix(str(push_error))} Then deploy again.")
    if push_error:
        return (f"The push to the Hub failed on the pod ({push_error}). "
                f"{push_fix(str(push_error), namespace)} Then deploy again.")
    if hub_configured:
        return ("The run pushed no merged model (HF_TOKEN and TUNER_HF_NAMESPACE are set, but "
                "this run did not upload one). Retrain to push it, then deploy again.")
    return ("Serverless workers download the model from the Hub, so set HF_TOKEN and "
            "TUNER_HF_NAMESPACE and retrain to push the merged model there, then deploy again.")
