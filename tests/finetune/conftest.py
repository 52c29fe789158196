"""Finetune tests run tiny models: one torch thread each (see the root conftest's `one_torch_thread`)."""
import pytest


@pytest.fixture(autouse=True)
def _finetune_on_one_torch_thread(one_torch_thread):
    yield
