"""One exception hierarchy for every failure a user can see.

A `TunerError` carries what the thread should say: `message` (what went wrong, in plain
words, no secrets, no environment-variable jargon unless the reader is the admin) and
`hint` (the next step). `detail` is for logs and admins only. `retryable` tells the bot
whether a Retry button can help. The bot renders a TunerError once, in the thread; any
other exception is a bug and is shown as "something went wrong" with its type only.

Layers raise their own subclasses (jobs.claude, jobs.deploy, the GPU cloud adapters,
agent imports, bot downloads); they never raise bare RuntimeError for user-facing cases.
"""

from __future__ import annotations

from typing import ClassVar


class TunerError(Exception):
    """Base of every user-facing failure."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class NotConfiguredError(TunerError):
    """A service a step needs is not wired (its key or token is missing)."""


class BudgetExceededError(TunerError):
    """Spending more would go over the project's budget cap."""


class TransientError(TunerError):
    """An outside service failed in a way that usually passes (rate limit, outage)."""

    retryable = True
