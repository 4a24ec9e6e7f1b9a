"""Admission: who may in, how fast, and what is shed first."""
