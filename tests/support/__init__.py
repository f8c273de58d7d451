"""Test doubles shared by the test packages: one copy of each, each verified against its interface."""
