"""One place that masks secrets before text reaches Slack, a log line or an exception."""

from __future__ import annotations

import logging
import re

from storage.settings import Settings

MASK = "[redacted]"

# token-shaped strings: Slack, Anthropic, Hugging Face, RunPod, bearer headers, ?api_key=
_TOKEN_RE = re.compile(
    r"xox[abeposr]-[A-Za-z0-9.-]+|xapp-[A-Za-z0-9-]+|sk-ant-[A-Za-z0-9_-]+|hf_[A-Za-z0-9]{8,}"
    r"|rpa_[A-Za-z0-9]+"
)
_PREFIXED_RE = re.compile(r"(api_key=|Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)


def secret_values(settings: Settings) -> list[str]:
    fields = (settings.slack_bot_token, settings.slack_app_token, settings.slack_signing_secret,
              settings.anthropic_api_key, settings.runpod_api_key, settings.hf_token)
    return [v.get_secret_value() for v in fields if v is not None and v.get_secret_value()]


def redact(text: str, settings: Settings | None = None) -> str:
    """Mask the configured secret values (when settings are given) and token-shaped strings."""
    if settings is not None:
        for value in secret_values(settings):
            text = text.replace(value, MASK)
    text = _TOKEN_RE.sub(MASK, text)
    return _PREFIXED_RE.sub(lambda m: m.group(1) + MASK, text)


class RedactingFilter(logging.Filter):
    """Log filter (install on handlers) that masks secrets in every formatted record."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.settings)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info),
                                     self.settings)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.settings)
        return True


def install_log_redaction(settings: Settings | None = None) -> None:
    """Attach a RedactingFilter to every handler of the root logger."""
    flt = RedactingFilter(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
