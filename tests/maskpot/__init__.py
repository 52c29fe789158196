"""Tests of the `maskpot` package."""
