"""Spaces: the room's lifecycle, roles and live state (the control plane of a live room)."""
