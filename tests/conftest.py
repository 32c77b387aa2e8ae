"""Shared fixtures. Nothing here downloads anything: tiny models are built in process and the
embedded models come from their PyPI packages."""

import os

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm():
    from lib.models import load_model

    return load_model("smollm2-135m")
