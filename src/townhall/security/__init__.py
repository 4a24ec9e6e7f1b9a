"""Secrets: password hashing and bearer tokens."""
