"""Tests of the `pretrain` package."""
