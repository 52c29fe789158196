"""Tests of the `data_shards` package."""
