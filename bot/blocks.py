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
SAMPLES_EDIT = "samples_edit"  # one per sample (section accessory); value carries the index
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
EDIT_CALLBACK = "tuner_sample_edit"
EDIT_PROMPT_BLOCK = "prompt"
EDIT_RESPONSE_BLOCK = "response"
EDIT_INPUT = "text"
EDIT_MAX_CHARS = 3000  # plain_text_input max_length (and so the most it can prefill)

_SECTION_MAX = 2900


def encode_value(interrupt_id: str, thread_id: str, index: int | None = None) -> str:
    d: dict[str, Any] = {"i": interrupt_id, "t": thread_id}
    if index is not None:
        d["n"] = index
    return json.dumps(d, separators=(",", ":"))


def decode_value(value: str) -> tuple[str, str]:
    d = json.loads(value)
    return str(d["i"]), str(d["t"])


def decode_index(value: str) -> int:
    """The sample index of an [Edit] button value (ValueError/KeyError when absent)."""
    return int(json.loads(value)["n"])


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
    interrupt_id: str, thread_id: str, examples: list[dict[str, Any]], round_: int = 1,
    edited: list[int] | tuple[int, ...] = (),
) -> tuple[str, list[dict]]:
    v = encode_value(interrupt_id, thread_id)
    blocks: list[dict] = [section(f"*Sample examples* (round {round_}, {len(examples)} shown)")]
    per = max(200, (_SECTION_MAX - 80) // 2)
    for n, ex in enumerate(examples[:20], 1):
        mark = " (edited by you)" if n - 1 in edited else ""
        blocks.append({"type": "divider"})
        block = section(
            f"*{n}. Prompt*{mark}\n{_clip(_esc(ex.get('prompt', '')), per)}\n"
            f"*Response*\n{_clip(_esc(ex.get('response', '')), per)}"
        )
        block["accessory"] = button(SAMPLES_EDIT, "Edit",
                                    encode_value(interrupt_id, thread_id, n - 1))
        blocks.append(block)
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
        + (f"Base model: `{_esc(e['base_model'])}`\n" if e.get("base_model") else "")
        + f"Estimate: ~{float(e.get('est_minutes', 0.0) or 0.0):.0f} min, ~${est:.2f}"
        + (f" (stopped at {float(e['cap_minutes']):.0f} min at the latest)\n"
           if e.get("cap_minutes") else "\n")
        + f"Budget: ${spent:.2f} spent of ${budget:.2f}"
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
                            int(payload.get("round", 1) or 1),
                            [int(i) for i in payload.get("edited") or []])
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


def _text_input(block_id: str, label: str, initial: str) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": EDIT_INPUT,
                               "multiline": True, "max_length": EDIT_MAX_CHARS}
    if initial:
        element["initial_value"] = initial
    return {"type": "input", "block_id": block_id,
            "label": {"type": "plain_text", "text": label}, "element": element}


def sample_edit_modal(
    interrupt_id: str, thread_id: str, index: int, example: dict[str, Any]
) -> dict[str, Any]:
    """Prefilled editor for sample `index` (0-based); the text must fit EDIT_MAX_CHARS."""
    return {
        "type": "modal",
        "callback_id": EDIT_CALLBACK,
        "private_metadata": json.dumps({"i": interrupt_id, "t": thread_id, "n": index}),
        "title": {"type": "plain_text", "text": f"Edit example {index + 1}"[:24]},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _text_input(EDIT_PROMPT_BLOCK, "Prompt", str(example.get("prompt", ""))),
            _text_input(EDIT_RESPONSE_BLOCK, "Response", str(example.get("response", ""))),
            {"type": "context", "elements": [{"type": "mrkdwn", "text":
                "Your version replaces this sample and is used as a gold example for the "
                "rest of the dataset."}]},
        ],
    }
