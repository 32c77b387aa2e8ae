"""The small multilayer perceptrons that distributed alignment search is first shown on.

The hierarchical-equality networks of the DAS tutorial of pyvene (Geiger, Wu et al. 2023,
"Finding alignments between interpretable causal variables and distributed neural
representations", section on hierarchical equality; Premack 1983 for the task): a stack of
Linear + ReLU blocks without residual connections and a linear head. ``hidden(x, layer)`` is the
output of block ``layer`` (pyvene's ``block_output``), ``forward_from(layer, h)`` runs the rest.

* :func:`hand_built_equality_mlp`: the tutorial's proof of concept (input 8, two blocks of width
  8): block 0 holds the positive and negative parts of W − X (units 0–3) and Y − Z (units 4–7).
* :func:`train_mlp`: Adam with the tutorial's schedule and loss (its HF ``Trainer`` ends up with
  BCE on one-hot labels); :func:`train_mlps` trains many such networks at once, each exactly as
  it would be trained alone.
* :func:`interchange_data`: the site activations of a counterfactual dataset, for ``lib.studies.das``.
* :func:`save_mlp` / :func:`load_mlp`: safetensors, never pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lib.studies.das.causal_model import CounterfactualDataset
from lib.studies.das import InterchangeData


INITS = ("normal", "torch")
LOSSES = ("bce", "ce")


class MLP(nn.Module):
    """``n_layers`` blocks Linear(h_dim, h_dim) + ReLU (the first takes ``d_in``), then a head
    Linear(h_dim, n_classes). ``init``: ``"normal"`` (weights N(0, 0.02²), biases 0: how the
    tutorial's model is initialised by transformers) or ``"torch"`` (nn.Linear's default)."""

    def __init__(self, d_in: int = 16, h_dim: int = 16, n_layers: int = 3, n_classes: int = 2,
                 seed: int = 0, init: str = "normal"):
        super().__init__()
        for name, val in (("d_in", d_in), ("h_dim", h_dim), ("n_layers", n_layers),
                          ("n_classes", n_classes)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        torch.manual_seed(int(seed))  # nn.Linear initialises from the global generator
        self.d_in, self.h_dim, self.n_layers, self.n_classes = d_in, h_dim, n_layers, n_classes
        self.blocks = nn.ModuleList(
            [nn.Linear(d_in if i == 0 else h_dim, h_dim) for i in range(n_layers)])
        self.head = nn.Linear(h_dim, n_classes)
        if init == "normal":  # what transformers' PreTrainedModel does to pyvene's MLP
            gen = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                for layer in [*self.blocks, self.head]:
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
                    layer.bias.zero_()

    def config(self) -> dict:
        return {"d_in": self.d_in, "h_dim": self.h_dim, "n_layers": self.n_layers,
                "n_classes": self.n_classes}

    def _check_layer(self, layer: int):
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an int from 0 to {self.n_layers - 1}, got {layer!r}")

    def hidden(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Output of block ``layer`` (after its ReLU)."""
        self._check_layer(layer)
        for block in self.blocks[:layer + 1]:
            x = torch.relu(block(x))
        return x

    def forward_from(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Logits, continuing from the output ``h`` of block ``layer``."""
        self._check_layer(layer)
        for block in self.blocks[layer + 1:]:
            h = torch.relu(block(h))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.n_layers - 1, self.hidden(x, self.n_layers - 1))


def hand_built_equality_mlp(object_dim: int = 2) -> MLP:
    """The tutorial's hand-crafted network for hierarchical equality (objects of ``object_dim``
    = 2, input [W, X, Y, Z] of width 8).

    Block 0: units 0–3 are relu(±(W − X)) per coordinate, units 4–7 relu(±(Y − Z)).
    Block 1: relu(|W−X| − |Y−Z|), relu(|Y−Z| − |W−X|), |W−X|, |Y−Z| (L1 norms), then zeros.
    Head: logit₀ = unit₀ + unit₁ − 0.999999 (unit₂ + unit₃), logit₁ = 1e-14. Class 1 (True)
    wins when both pairs are equal (all zero) or both differ.
    """
    if object_dim != 2:
        raise ValueError("the hand-built network is defined for object_dim 2 (width 8)")
    d = 4 * object_dim
    net = MLP(d, d, 2, 2, init="torch")
    with torch.no_grad():
        w0 = torch.zeros(d, d)
        for pair in range(2):                       # (W, X) then (Y, Z)
            first, second = 2 * pair * object_dim, (2 * pair + 1) * object_dim
            for i in range(object_dim):
                unit = pair * 2 * object_dim + 2 * i
                w0[unit, first + i], w0[unit, second + i] = 1, -1
                w0[unit + 1, first + i], w0[unit + 1, second + i] = -1, 1
        w1 = torch.zeros(d, d)
        ab, cd = slice(0, 2 * object_dim), slice(2 * object_dim, 4 * object_dim)
        w1[0, ab], w1[0, cd] = 1, -1
        w1[1, ab], w1[1, cd] = -1, 1
        w1[2, ab] = 1
        w1[3, cd] = 1
        head = torch.zeros(2, d)
        head[0, :2] = 1
        head[0, 2:4] = -0.999999
        block0, block1 = net.blocks[0], net.blocks[1]
        assert isinstance(block0, nn.Linear) and isinstance(block1, nn.Linear)  # MLP's blocks
        block0.weight.copy_(w0)
        block0.bias.zero_()
        block1.weight.copy_(w1)
        block1.bias.zero_()
        net.head.weight.copy_(head)
        net.head.bias.copy_(torch.tensor([0.0, 1e-14]))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@torch.no_grad()
def accuracy(net: MLP, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 65536) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += int((net(x[start:start + batch_size]).argmax(-1)
                        == labels[start:start + batch_size]).sum())
    return correct / len(x)


def train_mlp(net: MLP, x: torch.Tensor, labels: torch.Tensor, epochs: int = 3,
              batch_size: int = 1024, lr: float = 1e-3, seed: int = 0,
              eval_x: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
              loss: str = "bce", linear_decay: bool = True) -> list[dict]:
    """Adam; returns per epoch the mean loss and (given eval data) accuracy on it.

    ``loss``: ``"bce"`` (binary cross-entropy on one-hot labels, what the tutorial's HF
    ``Trainer`` run actually optimises) or ``"ce"`` (cross-entropy on the class index).
    ``linear_decay``: the learning rate falls linearly to 0 over all steps (the ``Trainer``
    default). One network of :func:`train_mlps`, which gives the same weights bit for bit."""
    evals = None if eval_x is None else [(eval_x, eval_labels)]
    return train_mlps([net], [x], [labels], epochs, batch_size, lr, [seed], evals, loss,
                      linear_decay)[0]


def train_mlps(nets: list[MLP], xs: list[torch.Tensor], labels: list[torch.Tensor],
               epochs: int = 3, batch_size: int = 1024, lr: float = 1e-3,
               seeds: list[int] | None = None, evals: list[tuple] | None = None,
               loss: str = "bce", linear_decay: bool = True) -> list[list[dict]]:
    """Train several networks of one shape at once, each on its own data with its own shuffle
    (``seeds[k]``), as :func:`train_mlp` would one at a time: their weights are stacked and
    every layer is one batched matmul, so K small networks cost little more than one.

    Nothing is shared between networks (Adam and the loss are per network; the summed loss
    has per-network gradients), and each network's weights equal, bit for bit, those of
    training it alone (a test checks this). ``xs[k]`` and ``labels[k]`` must have one length;
    ``evals[k]``: ``(x, labels)`` scored after every epoch. Returns each network's curve."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    k = len(nets)
    seeds = list(range(k)) if seeds is None else list(seeds)
    if not k or len(xs) != k or len(labels) != k or len(seeds) != k:
        raise ValueError(f"give one training set and seed per network: {k} networks, "
                         f"{len(xs)} inputs, {len(labels)} label sets, {len(seeds)} seeds")
    if len({tuple(net.config().items()) for net in nets}) != 1:
        raise ValueError("train_mlps needs networks of one shape")
    n = len(xs[0])
    if any(len(x) != n or len(y) != n for x, y in zip(xs, labels)):
        raise ValueError("every network's training set must have the same number of examples")
    layers = [[*net.blocks, net.head] for net in nets]
    weights = [torch.stack([ls[i].weight.detach() for ls in layers]).requires_grad_()
               for i in range(len(layers[0]))]
    biases = [torch.stack([ls[i].bias.detach() for ls in layers]).requires_grad_()
              for i in range(len(layers[0]))]
    opt = torch.optim.Adam([p for pair in zip(weights, biases) for p in pair], lr=lr)
    steps = epochs * -(-n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 1 - s / steps) if linear_decay else (lambda s: 1.0))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    flat_x = torch.cat(xs)                      # network k's examples at rows k*n .. k*n+n-1
    flat_y = torch.cat(labels)
    offsets = (torch.arange(k) * n)[:, None]
    curves: list[list[dict]] = [[] for _ in nets]
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]) + offsets
        totals = torch.zeros(k, dtype=torch.float64)
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]
            rows = idx.shape[1]
            h = flat_x.index_select(0, idx.reshape(-1)).view(k, rows, -1)
            target = flat_y.index_select(0, idx.reshape(-1)).view(k, rows)
            for i, (w, b) in enumerate(zip(weights, biases)):
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                if i < len(weights) - 1:
                    h = torch.relu(h)
            if loss == "bce":
                per_net = nn.functional.binary_cross_entropy_with_logits(
                    h, nn.functional.one_hot(target, h.shape[-1]).float(),
                    reduction="none").mean(dim=(1, 2))
            else:
                per_net = nn.functional.cross_entropy(
                    h.transpose(1, 2), target, reduction="none").mean(dim=1)
            opt.zero_grad(set_to_none=True)
            per_net.sum().backward()
            opt.step()
            sched.step()
            totals += per_net.detach().double() * rows
        with torch.no_grad():
            for j, ls in enumerate(layers):
                for i, lin in enumerate(ls):
                    lin.weight.copy_(weights[i][j])
                    lin.bias.copy_(biases[i][j])
        for j, net in enumerate(nets):
            net.eval()
            row = {"epoch": epoch + 1, "loss": float(totals[j]) / n}
            if evals is not None:
                row["eval_accuracy"] = accuracy(net, *evals[j])
            curves[j].append(row)
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(False)
    return curves


@torch.no_grad()
def interchange_data(net: MLP, layer: int, dataset: CounterfactualDataset) -> InterchangeData:
    """Block-``layer`` activations of the bases and of each variable's sources (the network is
    frozen, so they are computed once)."""
    base = net.hidden(dataset.base_tensor(), layer)
    sources = torch.stack([net.hidden(s, layer) for s in dataset.source_tensors()])
    return InterchangeData(base, sources, dataset.masks, dataset.labels)


def save_mlp(net: MLP, path: str | os.PathLike, metadata: dict | None = None,
             key: str | None = None) -> Path:
    """Weights as safetensors (atomic), config, ``metadata`` and ``key`` (the parameters key
    of what trained it) in the header."""
    from lib.core.io import save_tensors

    return save_tensors(path, net.state_dict(), net.config(), metadata, key=key)


def load_mlp(path: str | os.PathLike, key: str | None = None,
             unkeyed_ok: bool = False) -> tuple[MLP, dict]:
    """The network saved by :func:`save_mlp`, frozen, and its metadata; checked: readable,
    finite, the tensors and shapes of its config's network and (``key``) written with that
    parameters key (or none, if ``unkeyed_ok``: a cache named by its key). Else a
    :class:`lib.core.tensorfiles.TensorFileError` naming the file."""
    from lib.core.io import load_tensors
    from lib.core.tensorfiles import TensorFileError, check_shapes

    state, config, metadata = load_tensors(path, "MLP", key=key, unkeyed_ok=unkeyed_ok)
    try:
        net = MLP(**config)
    except (TypeError, ValueError) as err:
        raise TensorFileError(path, f"its config {config} builds no MLP ({err})") from err
    check_shapes(path, state, {k: tuple(v.shape) for k, v in net.state_dict().items()}, "MLP")
    net.load_state_dict(state)
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    return net, metadata
