"""What initialisation pyvene's ``MLPForClassification`` (the DAS tutorial's model, Geiger, Wu et
al. 2023) gets from transformers' ``PreTrainedModel.post_init``: prints the installed versions
and each parameter's mean, std and range for the tutorial's shape (h_dim 16, 3 blocks, 2
classes). Runs in a scratch environment with pyvene, not in the repository's venv:

    python3.11 -m venv /tmp/pv && /tmp/pv/bin/pip install pyvene transformers==4.57.6 torch==2.13.0
    /tmp/pv/bin/python scripts/pyvene_mlp_init.py
"""
import importlib.metadata as md

import torch

from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification
from transformers import PreTrainedModel
print({p: md.version(p) for p in ("pyvene", "transformers", "torch")})
print("MLPForClassification defines _init_weights:", "_init_weights" in MLPForClassification.__dict__)
print("PreTrainedModel._init_weights source owner:", PreTrainedModel._init_weights.__qualname__)
cfg = MLPConfig(h_dim=16, activation_function="relu", n_layer=3, num_classes=2, pdrop=0.0)
print("initializer_range on the config:", getattr(cfg, "initializer_range", None))
torch.manual_seed(0)
m = MLPForClassification(cfg)
for name, p in m.named_parameters():
    print(f"{name:28s} shape {tuple(p.shape)} mean {p.mean().item():+.4f} std {p.std().item():.4f} "
          f"min {p.min().item():+.4f} max {p.max().item():+.4f}")
ws = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("weight")])
bs = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("bias")])
print(f"all weights: n {ws.numel()} std {ws.std().item():.4f} max|w| {ws.abs().max().item():.4f}; "
      f"all biases: max|b| {bs.abs().max().item():.4f}")
print("nn.Linear(16,16) default for comparison: uniform(-0.25, 0.25), std", round(0.25 / 3 ** 0.5, 4))
