"""Distributed alignment search (DAS): rotated-subspace interchange interventions, trained.

Geiger, Wu, Potts, Icard and Goodman 2023, "Finding alignments between interpretable causal
variables and distributed neural representations" (DAS); Wu, Geiger, Icard, Potts and Goodman
2023, "Interpretability at scale: identifying causal mechanisms in Alpaca" (Boundless DAS); the
``RotatedSpaceIntervention`` family of pyvene (Wu et al. 2024). Our own implementation.

A rotated-subspace interchange replaces the part of a base activation ``h_b`` that lies in a
learned subspace with the source's part: with R (d × c) having orthonormal columns and a mask
``m`` over its c coordinates,

    h = h_b + ((h_s − h_b) R ⊙ m) Rᵀ.

For a full rotation (c = d) and a 0/1 mask this is "rotate, copy the chosen rotated coordinates
from the source, rotate back". Each aligned causal variable owns a subspace (a set of rotated
coordinates) and its own source; an example swaps only the subspaces of the variables it
intervenes on (``masks``). Three modules:

* :class:`RotatedSpaceIntervention`: R is d × d orthogonal; subspaces are coordinate ranges.
* :class:`LowRankRotatedSpaceIntervention`: R is d × k with orthonormal columns.
* :class:`BoundlessRotatedSpaceIntervention`: R is d × d; variable j owns a block of coordinates
  of which a learned fraction is swapped, through a sigmoid mask whose temperature is annealed.

R stays orthogonal through ``torch.nn.utils.parametrizations.orthogonal`` (map ``matrix_exp``,
``cayley`` or ``householder``: a choice). :func:`random_control` gives the same intervention with a
fixed random rotation (the control beside every learned subspace). :func:`train_das` trains R
(Adam, cross-entropy on the counterfactual label) with the network frozen, :func:`iia` measures
interchange-intervention accuracy (trained rotations are stored as safetensors by
:mod:`lib.studies.das.rotation_files`), and :func:`hooks_intervention` wraps a module with a bound
source as a ``lib.core.interventions.Intervention`` (kind ``"function"``), so it runs inside
``lib.core.hooks.patch`` on a language model, gradients included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrizations

ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")
SHUFFLES = ("examples", "batches")


class DASError(ValueError):
    """A DAS configuration or input that cannot be used."""


class _Rotation(nn.Module):
    def __init__(self, d: int, cols: int, seed: int, orthogonal_map: str | None):
        super().__init__()
        weight = torch.empty(d, cols)
        nn.init.orthogonal_(weight, generator=torch.Generator().manual_seed(int(seed)))
        # a Parameter, or after parametrizations.orthogonal the materialised (orthogonal) tensor
        self.weight: torch.Tensor = nn.Parameter(weight)
        if orthogonal_map is not None:
            # For a d × cols matrix with cols < d, PyTorch completes the start into a d × d
            # orthogonal base with torch.randn from the global generator. The base does not
            # move R at the start but sets the chart that training moves in, so without a
            # seed here a run's result would depend on what ran before it in the process.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                parametrizations.orthogonal(self, "weight", orthogonal_map=orthogonal_map)


def _subspace_masks(subspaces, width: int) -> torch.Tensor:
    """(n_subspaces, width) 0/1 masks: row j marks the rotated coordinates of subspace j."""
    masks = torch.zeros(len(subspaces), width)
    for j, (a, b) in enumerate(subspaces):
        masks[j, a:b] = 1
    return masks


def _check_subspaces(subspaces, width: int) -> list[tuple[int, int]]:
    out = []
    for sub in subspaces:
        if len(sub) != 2:
            raise DASError(f"each subspace is a (start, end) pair of rotated coordinates; got {sub}")
        a, b = int(sub[0]), int(sub[1])
        if not 0 <= a < b <= width:
            raise DASError(f"subspace {sub} is not a non-empty range inside [0, {width})")
        out.append((a, b))
    for (_, b), (c, _) in zip(sorted(out), sorted(out)[1:]):
        if c < b:
            raise DASError(f"subspaces {out} overlap; give each variable its own coordinates")
    return out


class _RotatedBase(nn.Module):
    """Shared forward: ``h_b + Σ_j row_j · ((h_sj − h_b) R ⊙ m_j) Rᵀ``."""

    kind = "rotated"
    _coord: torch.Tensor  # fixed masks, a buffer that subclasses with fixed subspaces register

    def __init__(self, d: int, cols: int, seed: int, orthogonal_map: str | None):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise DASError(f"d (the activation width) must be a positive int, got {d!r}")
        if orthogonal_map is not None and orthogonal_map not in ORTHOGONAL_MAPS:
            raise DASError(f"orthogonal_map must be one of {ORTHOGONAL_MAPS} or None, got "
                           f"{orthogonal_map!r}")
        self.d, self.cols, self.seed, self.orthogonal_map = d, cols, int(seed), orthogonal_map
        self.rotation = _Rotation(d, cols, seed, orthogonal_map)

    @property
    def R(self) -> torch.Tensor:
        """(d, c) with orthonormal columns."""
        return self.rotation.weight

    def set_rotation(self, R: torch.Tensor) -> None:
        if tuple(R.shape) != (self.d, self.cols):
            raise DASError(f"rotation must have shape {(self.d, self.cols)}, got {tuple(R.shape)}")
        with torch.no_grad():
            if self.orthogonal_map is None:
                self.rotation.weight.copy_(R)
            else:  # assigning completes a new base with torch.randn too: seeded, as at init
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    self.rotation.weight = R.detach().clone().float()

    def coordinate_masks(self) -> torch.Tensor:
        """(n_subspaces, c) weights of each rotated coordinate per subspace (fixed 0/1 masks
        in the ``_coord`` buffer, unless a subclass learns them)."""
        return self._coord

    @property
    def n_subspaces(self) -> int:
        return self.coordinate_masks().shape[0]

    def forward(self, base: torch.Tensor, sources, masks: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``base`` (..., d); ``sources`` one tensor or one per subspace, each shaped like
        ``base``; ``masks`` bool (rows, n_subspaces) (or None: every subspace swapped), rows
        being the first axis of ``base``."""
        coord = self.coordinate_masks()
        k = coord.shape[0]
        if isinstance(sources, torch.Tensor):
            sources = [sources] * k
        if len(sources) != k:
            raise DASError(f"{len(sources)} sources for {k} subspaces; give one per subspace")
        if base.shape[-1] != self.d:
            raise DASError(f"activations have width {base.shape[-1]}, the intervention {self.d}")
        R = self.R.to(base.dtype)
        rb = base @ R
        delta = torch.zeros_like(rb)
        for j, src in enumerate(sources):
            if src.shape != base.shape:
                raise DASError(f"source {j} has shape {tuple(src.shape)}, base {tuple(base.shape)}")
            part = (src @ R - rb) * coord[j].to(base.dtype)
            if masks is not None:
                row = masks[:, j].to(base.dtype).reshape(-1, *[1] * (base.dim() - 1))
                part = part * row
            delta = delta + part
        return base + delta @ R.T

    def config(self) -> dict:
        raise NotImplementedError


class RotatedSpaceIntervention(_RotatedBase):
    """Full d × d rotation; ``subspaces`` are (start, end) ranges of rotated coordinates, one per
    aligned variable (the DAS tutorial: [(0, 8), (8, 16)] for WX and YZ)."""

    kind = "full"

    def __init__(self, d: int, subspaces: Sequence[Sequence[int]] | None = None, seed: int = 0,
                 orthogonal_map: str | None = "matrix_exp"):
        super().__init__(d, d, seed, orthogonal_map)
        self.subspaces = _check_subspaces(subspaces or [(0, d)], d)
        self.register_buffer("_coord", _subspace_masks(self.subspaces, d), persistent=False)

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "subspaces": self.subspaces, "seed": self.seed,
                "orthogonal_map": self.orthogonal_map}


class LowRankRotatedSpaceIntervention(_RotatedBase):
    """R is d × ``rank`` with orthonormal columns: ``h_b + (h_s − h_b) R Rᵀ`` on each subspace
    (by default one subspace of all ``rank`` columns)."""

    kind = "low_rank"

    def __init__(self, d: int, rank: int, subspaces: Sequence[Sequence[int]] | None = None,
                 seed: int = 0, orthogonal_map: str | None = "householder"):
        if not isinstance(rank, int) or not 1 <= rank <= d:
            raise DASError(f"rank must be an int from 1 to d={d}, got {rank!r}")
        super().__init__(d, rank, seed, orthogonal_map)
        self.rank = rank
        self.subspaces = _check_subspaces(subspaces or [(0, rank)], rank)
        self.register_buffer("_coord", _subspace_masks(self.subspaces, rank), persistent=False)

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "rank": self.rank, "subspaces": self.subspaces,
                "seed": self.seed, "orthogonal_map": self.orthogonal_map}


class BoundlessRotatedSpaceIntervention(_RotatedBase):
    """Boundless DAS: full rotation; variable j owns coordinate block ``blocks[j]`` = (start,
    end) and swaps its first ``boundary_j`` of them, ``boundary_j = start + f_j (end − start)``
    with a learned fraction ``f_j`` in [0, 1]. Coordinate i gets weight
    ``sigmoid((boundary_j − (i + ½)) / temperature)``; set :attr:`temperature` from a schedule
    (:func:`train_das` anneals it linearly)."""

    kind = "boundless"

    def __init__(self, d: int, blocks: Sequence[Sequence[int]] | None = None, seed: int = 0,
                 orthogonal_map: str | None = "matrix_exp", init_fraction: float = 0.5,
                 temperature: float = 1.0):
        super().__init__(d, d, seed, orthogonal_map)
        self.blocks = _check_subspaces(blocks or [(0, d)], d)
        if not 0.0 <= float(init_fraction) <= 1.0:
            raise DASError(f"init_fraction must be in [0, 1], got {init_fraction!r}")
        self.fractions = nn.Parameter(torch.full((len(self.blocks),), float(init_fraction)))
        self.temperature = float(temperature)
        self.init_fraction = float(init_fraction)

    def boundaries(self) -> torch.Tensor:
        start = torch.tensor([a for a, _ in self.blocks], dtype=torch.float32)
        width = torch.tensor([b - a for a, b in self.blocks], dtype=torch.float32)
        return start + self.fractions.clamp(0.0, 1.0) * width

    def coordinate_masks(self) -> torch.Tensor:
        idx = torch.arange(self.d, dtype=torch.float32) + 0.5
        inside = torch.zeros(len(self.blocks), self.d)
        for j, (a, b) in enumerate(self.blocks):
            inside[j, a:b] = 1
        soft = torch.sigmoid((self.boundaries()[:, None] - idx[None, :]) / self.temperature)
        return soft * inside

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "blocks": self.blocks, "seed": self.seed,
                "orthogonal_map": self.orthogonal_map, "init_fraction": self.init_fraction,
                "temperature": self.temperature}


KINDS = {"full": RotatedSpaceIntervention, "low_rank": LowRankRotatedSpaceIntervention,
         "boundless": BoundlessRotatedSpaceIntervention}


def build(config: dict) -> _RotatedBase:
    """An intervention from its :meth:`config` (the rotation freshly initialised)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in KINDS:
        raise DASError(f"unknown intervention kind {kind!r}; use one of {sorted(KINDS)}")
    temperature = config.pop("temperature", None)
    module = KINDS[kind](**config)
    if temperature is not None:
        module.temperature = float(temperature)
    return module


def orthogonality_error(module: _RotatedBase) -> float:
    """Frobenius norm of RᵀR − I."""
    R = module.R.detach().double()
    return float(torch.linalg.norm(R.T @ R - torch.eye(R.shape[1], dtype=R.dtype)))


def random_rotation(d: int, cols: int, seed: int) -> torch.Tensor:
    """A Haar-random d × cols matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q[:, :cols].float()


def random_control(module: _RotatedBase, seed: int) -> _RotatedBase:
    """The same intervention (kind, subspaces, sizes, mask) with a fixed random rotation: the
    random-subspace control. Nothing in it is trainable."""
    control = build(module.config())
    if isinstance(module, BoundlessRotatedSpaceIntervention):
        assert isinstance(control, BoundlessRotatedSpaceIntervention)  # built from its config
        with torch.no_grad():
            control.fractions.copy_(module.fractions)
        control.temperature = module.temperature
    control.set_rotation(random_rotation(module.d, module.cols, seed))
    for p in control.parameters():
        p.requires_grad_(False)
    return control


# --- data, training, IIA ------------------------------------------------------------------

@dataclass
class InterchangeData:
    """Activations at the intervened site: ``base`` (n, d), ``sources`` (k, n, d) with one source
    per subspace, ``masks`` (n, k) bool, ``labels`` (n,) counterfactual class indices."""

    base: torch.Tensor
    sources: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        n = len(self.labels)
        if self.base.shape[0] != n or self.sources.shape[1] != n or self.masks.shape[0] != n:
            raise DASError(f"InterchangeData rows disagree: base {tuple(self.base.shape)}, "
                           f"sources {tuple(self.sources.shape)}, masks {tuple(self.masks.shape)}, "
                           f"labels {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> tuple:
        return self.base[idx], list(self.sources[:, idx]), self.masks[idx], self.labels[idx]


class InterchangeBatches(Protocol):
    """What :func:`train_das` and :func:`iia` read of their data: the number of examples and
    ``batch(idx)`` = (base, sources, masks, labels) of rows ``idx`` (:class:`InterchangeData`,
    or a duck type that builds its batches another way)."""

    def __len__(self) -> int: ...

    def batch(self, idx) -> tuple: ...


def _logits(module, head, data: InterchangeBatches, idx):
    base, sources, masks, labels = data.batch(idx)
    return head(module(base, sources, masks)), labels


@torch.no_grad()
def intervened_predictions(module: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
                           data: InterchangeBatches,
                           batch_size: int = 6400) -> tuple[torch.Tensor, torch.Tensor]:
    """The intervened network's answers (argmax of ``head``'s output) on the examples of
    ``data``, and their counterfactual labels: ``(predictions, labels)``, each of shape (n,)."""
    preds, labels = [], []
    for start in range(0, len(data), batch_size):
        logits, lab = _logits(module, head, data, slice(start, start + batch_size))
        preds.append(logits.argmax(-1))
        labels.append(lab)
    return torch.cat(preds), torch.cat(labels)


def iia(module: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
        data: InterchangeBatches, batch_size: int = 6400) -> float:
    """Interchange-intervention accuracy: argmax of the intervened output equals the causal
    model's counterfactual label."""
    preds, labels = intervened_predictions(module, head, data, batch_size)
    return int((preds == labels).sum()) / len(data)


def train_das(module: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
              train: InterchangeBatches, epochs: int = 10, batch_size: int = 6400,
              lr: float = 1e-3, seed: int = 0, eval_data: InterchangeBatches | None = None,
              temperature: tuple[float, float] = (10.0, 0.1), boundary_penalty: float = 0.0,
              progress: bool = False, shuffle: str = "examples") -> dict:
    """Train ``module`` (only its parameters) with Adam on cross-entropy of ``head``'s output
    against the counterfactual label. The head (the network above the site) stays frozen.

    Returns the curve per epoch: mean training loss, training accuracy of the epoch's batches,
    and (with ``eval_data``) held-out IIA; plus seconds per epoch (timing, not for result files).
    A boundless module's temperature is annealed linearly from ``temperature[0]`` to
    ``temperature[1]`` over all steps; ``boundary_penalty`` adds that times the summed learned
    fractions to the loss.

    ``shuffle``: ``"examples"`` reshuffles all examples every epoch; ``"batches"`` keeps each
    run of ``batch_size`` consecutive examples together as one batch and shuffles only the
    order of the batches (the DAS tutorial's sampler: with data drawn in blocks of
    ``batch_size`` sharing one intervention set, every batch intervenes on one set).
    """
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(val, int) or val < 1:
            raise DASError(f"{name} must be a positive int, got {val!r}")
    if not lr > 0:
        raise DASError(f"lr must be positive, got {lr!r}")
    if shuffle not in SHUFFLES:
        raise DASError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    if len(train) < 1:   # else a ZeroDivisionError after an epoch of no steps
        raise DASError("train holds no examples: the budget of training counterfactuals must "
                       "be at least 1")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise DASError("the intervention has no trainable parameters (a random control?)")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(train)
    steps = epochs * math.ceil(n / batch_size)
    boundless = module if isinstance(module, BoundlessRotatedSpaceIntervention) else None
    curve, step = [], 0
    for epoch in range(epochs):
        started = time.perf_counter()
        if shuffle == "examples":
            order = torch.randperm(n, generator=gen)
        else:
            starts = torch.randperm(math.ceil(n / batch_size), generator=gen) * batch_size
            order = torch.cat([torch.arange(int(a), min(int(a) + batch_size, n)) for a in starts])
        total, correct, seen = 0.0, 0, 0
        module.train()
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if boundless is not None:
                t0, t1 = temperature
                boundless.temperature = t0 + (t1 - t0) * step / max(steps - 1, 1)
            logits, labels = _logits(module, head, train, idx)
            loss = nn.functional.cross_entropy(logits, labels)
            if boundless is not None and boundary_penalty:
                loss = loss + boundary_penalty * boundless.fractions.clamp(0, 1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(idx)
        module.eval()
        row = {"epoch": epoch + 1, "loss": total / seen, "train_accuracy": correct / seen,
               "seconds": time.perf_counter() - started}
        if eval_data is not None:
            row["eval_iia"] = iia(module, head, eval_data, batch_size)
        curve.append(row)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, train acc "
                  f"{row['train_accuracy']:.4f}" +
                  (f", eval IIA {row['eval_iia']:.4f}" if "eval_iia" in row else ""))
    return {"curve": curve, "steps": step, "trainable_parameters": sum(p.numel() for p in params)}


# --- as an intervention of lib.core.hooks ------------------------------------------------------

def hooks_intervention(module: _RotatedBase, site: str, sources, masks: torch.Tensor | None = None,
                       positions: Sequence[int] | None = None, rows: Sequence[int] | None = None,
                       source: str = "das"):
    """A ``lib.core.interventions.Intervention`` (kind ``"function"``) applying ``module`` at
    ``site``.

    ``sources``: the source activation(s) bound to it, each shaped like the selected slice
    (rows, positions, d) (one tensor, or one per subspace); ``masks`` (rows, n_subspaces).
    Gradients flow to the module's parameters through ``lib.core.hooks.patch``.
    """
    from lib.core.interventions import Intervention

    def das_interchange(selected: torch.Tensor) -> torch.Tensor:
        return module(selected, sources, masks)

    return Intervention(site=site, positions=None if positions is None else tuple(positions),
                        kind="function", rows=None if rows is None else tuple(rows),
                        source=source, fn=das_interchange)
