"""Durable state: the database behind a small interface, and its migrations."""
