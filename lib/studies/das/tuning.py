"""The tuned model of the X+Y+Z= task (:mod:`lib.studies.das.arithmetic`): fine-tuning, its
weights cache, and the model loaded only when a result needs it.

* :func:`finetune`: the 28-way classification head (:func:`lib.studies.das.arithmetic.
  attach_classifier`) and the model's other trainable weights, fine-tuned with AdamW on the
  training arrangements until the validation accuracy reaches a target.
* :func:`tuned_model`: the tuned weights are cached as safetensors under ``.cache/arithmetic/``
  (never committed, never pickled), named by the key of the model and every training
  parameter and carrying that key, with the accuracies measured at training time and the
  checksum of the tensors they were measured on. A cached file is read back checked
  (:func:`lib.core.tensorfiles.load_tensors`: finite, this model's trainable tensors and
  shapes, the same key); one that fails is set aside and trained again, and a stored accuracy
  whose checksum does not match the tensors is measured again.
* :func:`lib.core.tensorfiles.tensors_sha256` of the tuned weights: which weights a result was
  computed with (fine-tuning is repeatable on one kind of CPU, not across kinds).
* :class:`LazyTuned`: the tuned model, loaded (or trained) on first use only, and refused
  unless its weights are the ones the stored results name.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from lib.core.tensorfiles import tensors_sha256

from lib.studies.das.arithmetic import (CACHE, TaskError, TaskTokens, accuracy,
                                        arrangement_tensor, attach_classifier, class_logits,
                                        label_of, split_arrangements, task_tokens)


def _trainable(lm, freeze_embeddings: bool) -> list[tuple[str, nn.Parameter]]:
    emb = lm.model.get_submodule(lm.spec.embed_path)
    frozen = {id(p) for p in emb.parameters()} if freeze_embeddings else set()
    return [(n, p) for n, p in lm.model.named_parameters() if id(p) not in frozen]


def finetune(lm, tokens: TaskTokens, split: dict[str, list[int]], epochs: int = 10,
             batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.0,
             seed: int = 0, val_target: float = 1.0, freeze_embeddings: bool = True,
             clip: float = 1.0, progress: bool = False) -> dict:
    """Fine-tune ``lm`` (with :func:`attach_classifier` already applied) on the training
    arrangements: AdamW, linear decay to 0 over ``epochs``, cross-entropy on the sum's class,
    gradient clipping. Stops after the first epoch whose validation accuracy reaches
    ``val_target``. Returns the curve per epoch (mean training loss, training accuracy of the
    epoch's batches, validation loss and accuracy) and ``seconds_per_step`` (timing, not for
    result files). Leaves the model in eval mode with no gradients. Its own loop: training
    needs gradients through the model's weights, which the engine treats as constants."""
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise TaskError(f"{name} must be a positive int, got {v!r}")
    if not lr > 0:
        raise TaskError(f"lr must be positive, got {lr!r}")
    named = _trainable(lm, freeze_embeddings)
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    train = torch.as_tensor(split["train"], dtype=torch.long)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    table = arrangement_tensor()
    val_idx = torch.as_tensor(split["val"], dtype=torch.long)
    val_labels = label_of(*table[val_idx].T)
    gen = torch.Generator().manual_seed(int(seed))
    curve, step_times = [], []
    try:
        for epoch in range(epochs):
            lm.model.train()
            order = train[torch.randperm(len(train), generator=gen)]
            loss_sum, correct = 0.0, 0
            for a in range(0, len(order), batch_size):
                idx = order[a:a + batch_size]
                t0 = time.perf_counter()
                logits = lm.model(input_ids=tokens.input_ids[idx].to(lm.device),
                                  use_cache=False).logits[:, -1].float()
                labels = label_of(*table[idx].T).to(logits.device)
                loss = nn.functional.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                step_times.append(time.perf_counter() - t0)
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(-1).cpu() == labels.cpu()).sum())
            lm.model.eval()
            vlog = class_logits(lm, tokens.input_ids[val_idx])
            row = {"epoch": epoch + 1, "train_loss": loss_sum / len(train),
                   "train_accuracy": correct / len(train),
                   "val_loss": float(nn.functional.cross_entropy(vlog, val_labels)),
                   "val_accuracy": float((vlog.argmax(-1) == val_labels).float().mean())}
            curve.append(row)
            if progress:
                print(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f} "
                      f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.4f} "
                      f"acc {row['val_accuracy']:.3f} | {sum(step_times[-steps_per_epoch:]):.0f} s",
                      flush=True)
            if row["val_accuracy"] >= val_target:
                break
    finally:
        lm.model.eval()
        for p in lm.model.parameters():
            p.requires_grad_(False)
    return {"curve": curve, "steps": len(step_times),
            "seconds_per_step": sum(step_times) / max(len(step_times), 1),
            "trainable_parameters": sum(p.numel() for p in params)}


def tuned_path(model_name: str, spec: dict, cache_dir: Path = CACHE) -> Path:
    from lib.core.io import params_key, slug

    return Path(cache_dir) / f"{slug(model_name)}-{params_key(spec)}.safetensors"


class LazyTuned:
    """:func:`tuned_model`'s model, loaded (from the cache, or trained) on first use of
    anything but its name, sizes, site table and tokenizer (read from the model as shipped).
    A notebook whose results are all stored and current then never fine-tunes: a fresh clone
    has the committed results, not the uncommitted weights cache.

    ``expected_sha256`` (the :func:`lib.core.tensorfiles.tensors_sha256` the stored results
    were computed with): weights that load or train to another fingerprint are refused, so new results are
    never mixed with stored ones of other weights (None: stored results that name no weights;
    a warning says that the two cannot be checked against each other)."""

    _CHEAP = ("name", "n_layers", "n_heads", "d_model", "d_head", "tokenizer", "spec")

    def __init__(self, model_name: str, expected_sha256: str | None = None, **ft_args):
        from lib.core.models import load_model

        shipped = load_model(model_name, device=ft_args.get("device", "auto"),
                             dtype=ft_args.get("dtype", "auto"), seed=ft_args.get("seed", 0))
        self._cheap = {k: getattr(shipped, k) for k in self._CHEAP}
        self._args = (model_name, ft_args)
        self._expected = expected_sha256
        self._lm = None

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._lm is None and name in self._cheap:
            return self._cheap[name]
        if self._lm is None:   # first use may sit inside torch.no_grad(); training needs grad
            with torch.enable_grad():
                lm, _, _, info = tuned_model(self._args[0], **self._args[1])
            got = info["weights_sha256"]
            if self._expected is not None and got != self._expected:
                raise TaskError(
                    f"{self._args[0]}: the tuned weights here (sha256 {got[:12]}..., "
                    f"{'from the cache' if info['cached'] else 'just trained'}) are not the ones "
                    f"the stored results were computed with ({self._expected[:12]}...): "
                    "fine-tuning from the same parameters on another kind of CPU rounds "
                    "differently. Rerun with FORCE=True to recompute every result with these "
                    "weights (or another FULL_COMPUTE_DIR to keep the stored ones), or put the "
                    "original weights file back in the cache")
            if self._expected is None:
                import warnings
                warnings.warn(f"{self._args[0]}: the stored results name no tuned weights (written "
                              "before weights were fingerprinted), so results computed now, with "
                              f"weights sha256 {got[:12]}..., cannot be checked to come from the "
                              "same weights (fine-tuning on another kind of CPU rounds "
                              "differently); FORCE=True recomputes all of them", stacklevel=2)
            self._lm = lm
        return getattr(self._lm, name)


def _cached(lm, tokens: TaskTokens, split: dict, path: Path, spec: dict,
             freeze_embeddings: bool) -> dict | None:
    """Load the cached tuned weights at ``path`` into ``lm`` and return their info, or None
    when they must be trained again: a file that is unreadable, not finite, of other tensors
    or shapes than this model's trainable ones, or written with another spec (its key; a file
    without one is named by it) is set aside with a warning. The stored accuracies are
    reported only for the tensors they were measured on (their checksum matches), else they
    are measured again here."""
    from lib.core.io import params_key
    from lib.core.tensorfiles import TensorFileError, load_tensors, set_aside

    shapes = {n: tuple(p.shape) for n, p in _trainable(lm, freeze_embeddings)}
    try:
        tensors, _config, meta = load_tensors(path, "fine-tuned model", key=params_key(spec),
                                              unkeyed_ok=True, shapes=shapes)
    except TensorFileError as err:
        set_aside(err, "fine-tuning again")
        return None
    lm.model.load_state_dict(tensors, strict=False)
    lm.model.eval()
    sha = tensors_sha256(tensors)
    if meta.get("weights_sha256") != sha:   # written before checksums, or changed since
        meta = {**meta, "test_accuracy": accuracy(lm, tokens, split["test"]),
                "val_accuracy": accuracy(lm, tokens, split["val"])}
    return {**meta, "cached": True, "weights_sha256": sha}


def tuned_model(model_name: str, fmt: str = "padded", split_seed: int = 0, n_val: int = 100,
                n_test: int = 200, epochs: int = 10, batch_size: int = 32, lr: float = 1e-4,
                weight_decay: float = 0.0, seed: int = 0, val_target: float = 1.0,
                freeze_embeddings: bool = True, device: str = "auto", dtype: str = "auto",
                cache_dir: Path | None = CACHE, force: bool = False, progress: bool = False):
    """The fine-tuned model: loaded from the safetensors cache when it holds one trained with
    exactly these settings, else trained and cached. Returns ``(lm, tokens, split, info)``;
    ``info`` holds the curve, the test accuracy, whether it came from the cache and the
    :func:`lib.core.tensorfiles.tensors_sha256` of the trained tensors (``weights_sha256``)."""
    from lib.core.io import params_key, save_tensors
    from lib.core.models import load_model

    lm = load_model(model_name, device=device, dtype=dtype, seed=seed)
    tokens = task_tokens(lm.tokenizer, fmt)
    split = split_arrangements(split_seed, n_val, n_test)
    spec = {"model": model_name, "source": {k: v for k, v in lm.source.items()
                                            if k not in ("converted_in_s", "elapsed_s")},
            "fmt": fmt, "split_seed": split_seed, "n_val": n_val, "n_test": n_test,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "seed": seed, "val_target": val_target, "freeze_embeddings": freeze_embeddings,
            "dtype": str(lm.dtype), "version": 1}
    torch.manual_seed(seed)
    attach_classifier(lm, seed)
    path = tuned_path(model_name, spec, cache_dir) if cache_dir else None
    info = _cached(lm, tokens, split, path, spec, freeze_embeddings) \
        if path is not None and path.exists() and not force else None
    if info is None:
        out = finetune(lm, tokens, split, epochs, batch_size, lr, weight_decay, seed,
                       val_target, freeze_embeddings, progress=progress)
        trained = {n for n, _ in _trainable(lm, freeze_embeddings)}
        state = {n: p.detach().cpu().contiguous() for n, p in lm.model.named_parameters()
                 if n in trained}
        info = {"curve": out["curve"], "steps": out["steps"],
                "trainable_parameters": out["trainable_parameters"],
                "test_accuracy": accuracy(lm, tokens, split["test"]),
                "val_accuracy": out["curve"][-1]["val_accuracy"],
                "seconds_per_step": out["seconds_per_step"], "cached": False,
                "weights_sha256": tensors_sha256(state)}
        if path is not None:   # the accuracies are stored with the checksum they belong to
            save_tensors(path, state, spec, {k: v for k, v in info.items() if k != "cached"},
                         key=params_key(spec))
    lm.model.eval()
    lm.model.requires_grad_(False)
    return lm, tokens, split, info
