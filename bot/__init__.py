"""Slack adapter: Bolt app, handlers, Block Kit builders, presenter, CLI."""
