"""Persistence layer: settings, SQLModel tables and repository functions."""
