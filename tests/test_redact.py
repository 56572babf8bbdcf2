from pydantic import SecretStr

from storage.redact import redact
from storage.settings import Settings


def test_masks_configured_values_and_token_shapes() -> None:
    settings = Settings(_env_file=None, runpod_api_key=SecretStr("PLAIN123SECRET"),  # type: ignore[call-arg]
                        slack_signing_secret=SecretStr("sigsecret42"))
    text = ("key PLAIN123SECRET sig sigsecret42 xoxb-1-abc xapp-1-A-2 sk-ant-api03-x_y "
            "xoxe-1-refresh.tok xoxe.xoxp-1-rot hf_abcdefghijkl rpa_ABC123 Authorization: Bearer tok.en-1 url?api_key=k3y&x=1")
    out = redact(text, settings)
    for secret in ("PLAIN123SECRET", "sigsecret42", "xoxb-1-abc", "xapp-1-A-2", "sk-ant-api03",
                   "hf_abcdefghijkl", "rpa_ABC123", "xoxe-1-refresh", "xoxp-1-rot", "tok.en-1", "k3y"):
        assert secret not in out
    assert "Bearer [redacted]" in out and "api_key=[redacted]&x=1" in out
    assert redact("nothing secret here") == "nothing secret here"


def test_log_filter_masks_messages_args_and_tracebacks() -> None:
    import io
    import logging

    from storage.redact import RedactingFilter

    settings = Settings(_env_file=None, anthropic_api_key=SecretStr("PLAINKEY99"))  # type: ignore[call-arg]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(settings))
    log = logging.getLogger("tuner.test.redact")
    log.addHandler(handler)
    try:
        log.warning("calling with %s and %s", "PLAINKEY99", "xoxb-9-zzz")
        log.warning("with stack PLAINKEY99", stack_info=True)
        try:
            raise RuntimeError("boom Bearer abc.def PLAINKEY99")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "PLAINKEY99" not in out and "xoxb-9-zzz" not in out and "abc.def" not in out
    assert "calling with [redacted] and [redacted]" in out and "RuntimeError" in out
