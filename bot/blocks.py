"""Block Kit builders. Pure functions: payload dicts in, Slack block lists out."""

from __future__ import annotations

import json
from typing import Any

from agent.ports import Action

# action ids (handlers.py listens to exactly these)
SPEC_APPROVE = "spec_approve"
SPEC_CHANGE = "spec_change"
SAMPLES_APPROVE = "samples_approve"
SAMPLES_REGENERATE = "samples_regenerate"
LAUNCH = "launch"
DEPLOY = "deploy"
DEPLOY_SKIP = "deploy_skip"
UNDEPLOY = "undeploy"
STOP_RUN = "stop_run"
INTERRUPT_ACTIONS = (
    SPEC_APPROVE, SPEC_CHANGE, SAMPLES_APPROVE, SAMPLES_REGENERATE,
    LAUNCH, DEPLOY, DEPLOY_SKIP, UNDEPLOY,
)
FEEDBACK_CALLBACK = "tuner_feedback"
FEEDBACK_BLOCK = "feedback"
FEEDBACK_INPUT = "text"

_SECTION_MAX = 2900


def encode_value(interrupt_id: str, thread_id: str) -> str:
    return json.dumps({"i": interrupt_id, "t": thread_id}, separators=(",", ":"))


def decode_value(value: str) -> tuple[str, str]:
    d = json.loads(value)
    return str(d["i"]), str(d["t"])


def _clip(text: str, n: int = _SECTION_MAX) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text or " ")}}


def button(action_id: str, label: str, value: str, style: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "text": {"type": "plain_text", "text": label[:75]},
        "value": value,
    }
    if style in ("primary", "danger"):
        b["style"] = style
    return b


def actions(*buttons: dict[str, Any], block_id: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "actions", "elements": list(buttons)}
    if block_id:
        block["block_id"] = block_id[:255]
    return block


def action_buttons(items: list[Action]) -> list[dict[str, Any]]:
    if not items:
        return []
    return [actions(*[button(a.action_id, a.label, a.value, a.style) for a in items])]


def _esc(v: Any) -> str:
    return str(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def spec_card(interrupt_id: str, thread_id: str, spec: dict[str, Any]) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    lines = [f"*Task spec: {_esc(spec.get('name', 'untitled'))}*"]
    for key in ("description", "inputs", "output_requirements", "style", "base_model",
                "example_count"):
        if spec.get(key) not in (None, "", []):
            val = spec[key]
            if isinstance(val, list):
                val = ", ".join(map(str, val))
            lines.append(f"*{key.replace('_', ' ').capitalize()}:* {_esc(val)}")
    blocks = [section("\n".join(lines))]
    if spec.get("system_prompt"):
        blocks.append(section("*System prompt:*\n```" + _esc(spec["system_prompt"]) + "```"))
    blocks.append(actions(
        button(SPEC_APPROVE, "Looks good", v, "primary"),
        button(SPEC_CHANGE, "Change", v),
        block_id=f"ask:{interrupt_id}",
    ))
    return f"Task spec: {spec.get('name', 'untitled')}", blocks


def samples_card(
    interrupt_id: str, thread_id: str, examples: list[dict[str, Any]], round_: int = 1
) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    blocks: list[dict] = [section(f"*Sample examples* (round {round_}, {len(examples)} shown)")]
    per = max(200, (_SECTION_MAX - 60) // 2)
    for n, ex in enumerate(examples[:20], 1):
        blocks.append({"type": "divider"})
        blocks.append(section(
            f"*{n}. Prompt*\n{_clip(_esc(ex.get('prompt', '')), per)}\n"
            f"*Response*\n{_clip(_esc(ex.get('response', '')), per)}"
        ))
    blocks.append(actions(
        button(SAMPLES_APPROVE, "Approve", v, "primary"),
        button(SAMPLES_REGENERATE, "Regenerate with feedback", v),
        block_id=f"ask:{interrupt_id}",
    ))
    return f"{len(examples)} sample examples (round {round_})", blocks


def launch_card(
    interrupt_id: str, thread_id: str, estimate: dict[str, Any], dataset: dict[str, Any]
) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    e = estimate
    price_note = "live price" if e.get("price_is_live") else "list price (estimate)"
    spent, budget, est = (float(e.get(k, 0.0) or 0.0) for k in ("spent_usd", "budget_usd", "est_usd"))
    text = (
        "*Ready to train*\n"
        f"Dataset: {dataset.get('n_train', 0)} train / {dataset.get('n_val', 0)} val / "
        f"{dataset.get('n_test', 0)} test\n"
        f"GPU: {_esc(e.get('gpu_type', '?'))} ({_esc(e.get('cloud_type', '?'))}) at "
        f"${float(e.get('price_per_hour', 0.0) or 0.0):.2f}/h, {price_note}\n"
        f"Estimate: ~{float(e.get('est_minutes', 0.0) or 0.0):.0f} min, ~${est:.2f}\n"
        f"Budget: ${spent:.2f} spent of ${budget:.2f}"
    )
    blocks = [section(text)]
    if spent + est > budget:
        blocks.append(section(":warning: This launch would exceed the project budget."))
    blocks.append(actions(button(LAUNCH, "Launch", v, "primary"), block_id=f"ask:{interrupt_id}"))
    return "Ready to train: launch?", blocks


def deploy_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    text = payload.get("text") or f"Run {payload.get('run_id')} finished. Deploy it?"
    extra = []
    if payload.get("win_rate") is not None:
        wr = float(payload["win_rate"])
        ci = ""
        if payload.get("ci_low") is not None and payload.get("ci_high") is not None:
            ci = f" (95% CI {float(payload['ci_low']):.0%}–{float(payload['ci_high']):.0%})"
        extra.append(f"Win rate vs reference: {wr:.0%}{ci}")
    blocks = [section("\n".join([str(text), *extra]))]
    blocks.append(actions(
        button(DEPLOY, "Deploy", v, "primary"),
        button(DEPLOY_SKIP, "Skip", v),
        block_id=f"ask:{interrupt_id}",
    ))
    return str(text), blocks


def deployed_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    text = payload.get("text") or f"Deployment {payload.get('deployment_id')} is live."
    blocks = [section(str(text))]
    if payload.get("curl"):
        blocks.append(section("```" + _esc(payload["curl"]) + "```"))
    blocks.append(actions(button(UNDEPLOY, "Undeploy", v, "danger"), block_id=f"ask:{interrupt_id}"))
    return str(text), blocks


def ask_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> tuple[str, list[dict]]:
    kind = payload.get("kind")
    if kind == "question":
        return str(payload.get("text", "")), [section(str(payload.get("text", "")))]
    if kind == "spec":
        return spec_card(interrupt_id, thread_id, payload.get("spec") or {})
    if kind == "samples":
        return samples_card(interrupt_id, thread_id, payload.get("examples") or [],
                            int(payload.get("round", 1) or 1))
    if kind == "launch":
        return launch_card(interrupt_id, thread_id, payload.get("estimate") or {},
                           payload.get("dataset") or {})
    if kind == "deploy":
        return deploy_card(interrupt_id, thread_id, payload)
    if kind == "deployed":
        return deployed_card(interrupt_id, thread_id, payload)
    text = str(payload.get("text") or f"Pending: {kind}")
    return text, [section(text)]


def done_blocks(text: str) -> list[dict]:
    """Replaces a card's buttons once it has been answered."""
    return [section(text)]


def feedback_modal(interrupt_id: str, thread_id: str, action: str, title: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": FEEDBACK_CALLBACK,
        "private_metadata": json.dumps({"i": interrupt_id, "t": thread_id, "a": action}),
        "title": {"type": "plain_text", "text": title[:24]},
        "submit": {"type": "plain_text", "text": "Send"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{
            "type": "input",
            "block_id": FEEDBACK_BLOCK,
            "label": {"type": "plain_text", "text": "What should change?"},
            "element": {"type": "plain_text_input", "action_id": FEEDBACK_INPUT, "multiline": True},
        }],
    }
