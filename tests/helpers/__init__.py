"""Helpers shared by test modules (plain functions and classes; fixtures live in the conftest.py files)."""
