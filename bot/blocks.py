"""Block Kit builders. Pure functions: payload dicts in, Slack cards (messages) out.

Every card stays inside Slack's limits whatever it is given (bot/limits.py, bot/layout.py):
long content is split over sections and messages, user content is escaped and measured
as Slack measures it, and the buttons always arrive, on the card's last message.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.ports import Action
from bot import limits as L
from bot.layout import (
    Attachment,
    Card,
    Message,
    code_sections,
    pack,
    section,
    sections,
    single,
)

# action ids (handlers.py listens to exactly these)
SPEC_APPROVE = "spec_approve"
SPEC_CHANGE = "spec_change"
SAMPLES_APPROVE = "samples_approve"
SAMPLES_REGENERATE = "samples_regenerate"
SAMPLES_EDIT = "samples_edit"  # one per sample (section accessory); value carries the index
# Slack wants action ids unique within a message: sample n's button is "samples_edit:n"
SAMPLES_EDIT_RE = re.compile(rf"^{SAMPLES_EDIT}(:\d+)?$")
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
# one action id per input: Slack wants action ids unique in a view
EDIT_INPUTS = {EDIT_PROMPT_BLOCK: "prompt_text", EDIT_RESPONSE_BLOCK: "response_text"}
EDIT_MAX_CHARS = L.INPUT_MAX  # plain_text_input max_length (and so the most it can prefill)
MAX_SAMPLES_SHOWN = 20
PROMPT_PREVIEW = 900  # per sample, in Slack units after escaping; the rest is in the file
RESPONSE_PREVIEW = 1900


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


def button(action_id: str, label: str, value: str, style: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "text": {"type": "plain_text", "text": L.plain(label, L.BUTTON_TEXT_MAX)},
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
    """Buttons in actions blocks of at most 25 (Slack's limit per block)."""
    made = [button(a.action_id, a.label, a.value, a.style) for a in items]
    return [actions(*made[i:i + L.ACTIONS_MAX]) for i in range(0, len(made), L.ACTIONS_MAX)]


_esc = L.escape


def _units(text: str) -> list[list[dict[str, Any]]]:
    return [[b] for b in sections(text)]


def spec_card(interrupt_id: str, thread_id: str, spec: dict[str, Any]) -> Card:
    v = encode_value(interrupt_id, thread_id)
    name = spec.get("name") or "untitled"
    lines = [f"*Task spec: {_esc(name)}*"]
    for key in ("description", "inputs", "output_requirements", "style", "base_model",
                "example_count"):
        if spec.get(key) not in (None, "", []):
            val = spec[key]
            if isinstance(val, list):
                val = ", ".join(map(str, val))
            lines.append(f"*{key.replace('_', ' ').capitalize()}:* {_esc(val)}")
    units = _units("\n".join(lines))
    if spec.get("system_prompt"):
        units.append(code_sections(_esc(spec["system_prompt"]), "*System prompt:*"))
    tail = [actions(
        button(SPEC_APPROVE, "Looks good", v, "primary"),
        button(SPEC_CHANGE, "Change", v),
        block_id=f"ask:{interrupt_id}",
    )]
    return Card(pack(units, tail, f"Task spec: {_esc(name)}"))


def _sample_unit(
    interrupt_id: str, thread_id: str, n: int, ex: dict[str, Any], edited: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Sample n (1-based): divider + preview with its [Edit] button; and whether cut."""
    prompt, cut_p = L.clip_escaped(ex.get("prompt", ""), PROMPT_PREVIEW)
    response, cut_r = L.clip_escaped(ex.get("response", ""), RESPONSE_PREVIEW)
    mark = " (edited by you)" if edited else ""
    block = section(f"*{n}. Prompt*{mark}\n{prompt or '-'}\n*Response*\n{response or '-'}")
    block["accessory"] = button(f"{SAMPLES_EDIT}:{n - 1}", "Edit",
                                encode_value(interrupt_id, thread_id, n - 1))
    return [{"type": "divider"}, block], cut_p or cut_r


def samples_file(examples: list[dict[str, Any]], round_: int) -> Attachment:
    """All samples in full, as JSONL (the format the thread's import accepts)."""
    lines = [json.dumps({"prompt": str(ex.get("prompt", "")), "response": str(ex.get("response", ""))},
                        ensure_ascii=False) for ex in examples]
    return Attachment(f"samples-round-{round_}.jsonl", ("\n".join(lines) + "\n").encode(),
                      f"Sample examples, round {round_} (full text)")


def samples_card(
    interrupt_id: str, thread_id: str, examples: list[dict[str, Any]], round_: int = 1,
    edited: list[int] | tuple[int, ...] = (),
) -> Card:
    """Previews of the samples over as many messages as they need; when a preview is cut
    (or more samples exist than are shown) the full set goes along as a JSONL file."""
    v = encode_value(interrupt_id, thread_id)
    units, cut = [], len(examples) > MAX_SAMPLES_SHOWN
    for n, ex in enumerate(examples[:MAX_SAMPLES_SHOWN], 1):
        unit, was_cut = _sample_unit(interrupt_id, thread_id, n, ex, n - 1 in edited)
        units.append(unit)
        cut = cut or was_cut
    attachment = samples_file(examples, round_) if cut else None
    head = f"*Sample examples* (round {round_}, {min(len(examples), MAX_SAMPLES_SHOWN)} shown)"
    if attachment is not None:
        head += (f"\nLong samples are shortened here; all {len(examples)} in full are in "
                 f"`{attachment.filename}` in this thread.")
    tail = [actions(
        button(SAMPLES_APPROVE, "Approve", v, "primary"),
        button(SAMPLES_REGENERATE, "Regenerate with feedback", v),
        block_id=f"ask:{interrupt_id}",
    )]
    text = f"{len(examples)} sample examples (round {round_})"
    return Card(pack([[section(head)], *units], tail, text), attachment)


def launch_card(
    interrupt_id: str, thread_id: str, estimate: dict[str, Any], dataset: dict[str, Any]
) -> Card:
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
    units = _units(text)
    if spent + est > budget:
        units.append([section(":warning: This launch would exceed the project budget.")])
    tail = [actions(button(LAUNCH, "Launch", v, "primary"), block_id=f"ask:{interrupt_id}")]
    return Card(pack(units, tail, "Ready to train: launch?"))


def deploy_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> Card:
    v = encode_value(interrupt_id, thread_id)
    text = _esc(payload.get("text") or f"Run {payload.get('run_id')} finished. Deploy it?")
    extra = []
    if payload.get("win_rate") is not None:
        wr = float(payload["win_rate"])
        ci = ""
        if payload.get("ci_low") is not None and payload.get("ci_high") is not None:
            ci = f" (95% CI {float(payload['ci_low']):.0%}–{float(payload['ci_high']):.0%})"
        extra.append(f"Win rate vs reference: {wr:.0%}{ci}")
    tail = [actions(
        button(DEPLOY, "Deploy", v, "primary"),
        button(DEPLOY_SKIP, "Skip", v),
        block_id=f"ask:{interrupt_id}",
    )]
    return Card(pack(_units("\n".join([text, *extra])), tail, text))


def deployed_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> Card:
    v = encode_value(interrupt_id, thread_id)
    text = _esc(payload.get("text") or f"Deployment {payload.get('deployment_id')} is live.")
    units = _units(text)
    if payload.get("curl"):
        units.append(code_sections(_esc(payload["curl"])))
    tail = [actions(button(UNDEPLOY, "Undeploy", v, "danger"), block_id=f"ask:{interrupt_id}")]
    return Card(pack(units, tail, text))


def text_card(text: str) -> Card:
    """A card without buttons (a question, a failed step): the text, escaped, in full."""
    escaped = _esc(text) if text.strip() else "-"
    return Card(pack(_units(escaped), [], escaped))


def ask_card(interrupt_id: str, thread_id: str, payload: dict[str, Any]) -> Card:
    kind = payload.get("kind")
    if kind == "question":
        return text_card(str(payload.get("text", "")))
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
    return text_card(str(payload.get("text") or f"Pending: {kind}"))


def progress_message(text: str, items: list[Action]) -> Message:
    """A progress message (edited in place, so always one message) with its buttons."""
    return single(text, action_buttons(items))


def done_blocks(text: str) -> list[dict]:
    """Replaces a card's buttons once it has been answered."""
    return sections(text)


def feedback_modal(interrupt_id: str, thread_id: str, action: str, title: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": FEEDBACK_CALLBACK,
        "private_metadata": json.dumps({"i": interrupt_id, "t": thread_id, "a": action}),
        "title": {"type": "plain_text", "text": L.plain(title, L.MODAL_TITLE_MAX)},
        "submit": {"type": "plain_text", "text": "Send"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{
            "type": "input",
            "block_id": FEEDBACK_BLOCK,
            "label": {"type": "plain_text", "text": "What should change?"},
            "element": {"type": "plain_text_input", "action_id": FEEDBACK_INPUT, "multiline": True},
        }],
    }


def fits_editor(example: dict[str, Any]) -> bool:
    """Whether the sample's prompt and response fit the editor's boxes (as Slack counts)."""
    return all(L.slack_len(str(example.get(k, ""))) <= EDIT_MAX_CHARS
               for k in ("prompt", "response"))


def _text_input(block_id: str, label: str, initial: str) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": EDIT_INPUTS[block_id],
                               "multiline": True, "max_length": EDIT_MAX_CHARS}
    if initial:
        element["initial_value"] = initial
    return {"type": "input", "block_id": block_id,
            "label": {"type": "plain_text", "text": label}, "element": element}


def sample_edit_modal(
    interrupt_id: str, thread_id: str, index: int, example: dict[str, Any]
) -> dict[str, Any]:
    """Prefilled editor for sample `index` (0-based); check fits_editor(example) first."""
    return {
        "type": "modal",
        "callback_id": EDIT_CALLBACK,
        "private_metadata": json.dumps({"i": interrupt_id, "t": thread_id, "n": index}),
        "title": {"type": "plain_text", "text": L.plain(f"Edit example {index + 1}",
                                                        L.MODAL_TITLE_MAX)},
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
