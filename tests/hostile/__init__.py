"""Hostile input at unit level: property tests and bounded fuzzing."""
