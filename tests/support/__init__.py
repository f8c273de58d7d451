"""Shared test fakes and helpers."""
