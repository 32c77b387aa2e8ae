"""Attribution patching: a first-order (gradient) estimate of every activation patch at once.

Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial
Scale"; Syed, Rager and Conmy 2023, "Attribution Patching Outperforms Automated Circuit
Discovery") replaces the one-forward-per-cell sweep of activation patching by a linear
approximation. For a metric ``m`` of the base run's output and an activation ``a`` at one site
and position,

    m(patch a := a_source) - m(base)  ~  (a_source - a_base) . dm/da  evaluated at a_base,

so one forward and one backward pass on the base (plus one forward on the source to cache
``a_source``) estimate the effect of patching every site and position. The estimate is exact
when ``m`` is linear in ``a``; it is poor where the model saturates (e.g. a softmax probability
near 0 or 1), which is why it is worth drawing next to the exact grid.

Gradients are taken with respect to the activations themselves: the base run goes through
the engine (:mod:`lib.core.engine`, ``grad=True``) with an identity "function" intervention at
every site, whose input is the activation the rest of the pass uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lib.core.engine import Capture, Context, Engine, Row
from lib.core.interventions import Intervention

Metric = Callable[[torch.Tensor], torch.Tensor]
"""A metric maps the last-position logits (vocab,), float32 or wider, to a scalar tensor."""


def attribution_patching(lm, base_ids: torch.Tensor, source_ids: torch.Tensor,
                         sites: Sequence[str], metrics: Mapping[str, Metric],
                         engine: Engine | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor],
                                    dict[str, float]]:
    """Estimate ``metric(patched) - metric(base)`` for patching each site at each position.

    ``base_ids`` and ``source_ids`` are (1, pos) and position-aligned (same length).
    Returns ``(estimates, delta_norm, clean)``:

    * ``estimates[metric][site]``: tensor (pos,), the estimate ``(a_s - a_b) . dm/da_b`` summed
      over the site's feature dimensions (heads included for ``head_out``);
    * ``delta_norm[site]``: tensor (pos,), ``||a_s - a_b||`` (0 where the patch is a no-op);
    * ``clean[metric]``: the metric on the unpatched base run.

    One forward pass on the source (no grad), one on the base with grad, and one backward pass
    per metric (the graph is kept between them). ``engine``: one whose contexts 0 and 1 are
    this base and source (e.g. the interchange grid's), so their clean runs are not repeated.
    """
    if base_ids.dim() == 1:
        base_ids = base_ids[None]
    if source_ids.dim() == 1:
        source_ids = source_ids[None]
    if base_ids.shape != source_ids.shape or base_ids.shape[0] != 1:
        raise ValueError(f"attribution patching needs one base and one source of the same length; "
                         f"got shapes {tuple(base_ids.shape)} and {tuple(source_ids.shape)}")
    if not metrics:
        raise ValueError("give at least one metric")
    sites = list(dict.fromkeys(sites))
    if engine is None:
        engine = Engine(lm, [Context(base_ids, name="base"), Context(source_ids, name="source")],
                        skip_noops=False)
    elif not (len(engine.contexts) >= 2
              and torch.equal(engine.contexts[0].input_ids.cpu(), base_ids.cpu())
              and torch.equal(engine.contexts[1].input_ids.cpu(), source_ids.cpu())):
        raise ValueError("engine: its contexts 0 and 1 must be base_ids and source_ids")
    base_cache, src_cache = ({s: v[None] for s, v in
                              engine.clean_readout(c, Capture(tuple(sites))).items()}
                             for c in (0, 1))
    # Where base and source agree on every token up to p, their activations at p are the same
    # (causal attention); batched runs may differ there in the last bits, so set them equal.
    shared = engine.shared_prefix(0, 1)
    for site in sites:
        src_cache[site] = src_cache[site].clone()
        src_cache[site][:, :shared] = base_cache[site][:, :shared]

    # A "function" intervention that returns the tensor it receives puts that tensor into the
    # graph: the metric's gradient with respect to it is dm/da at every position. The model's
    # weights are frozen, so the first site reached becomes a leaf that requires grad (and so
    # does any later one that does not depend on it); detaching only such tensors cuts no path
    # from an earlier site.
    recorded: dict[str, torch.Tensor] = {}

    def recorder(site):
        def fn(x):
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            recorded[site] = x
            return x
        return fn

    row = Row(0, [Intervention(s, kind="function", fn=recorder(s), source="attribution")
                  for s in sites])
    with torch.enable_grad():
        logits = engine.run([row], grad=True)[0]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        acts = recorded
        missing = [s for s in sites if s not in acts]
        if missing:
            raise RuntimeError(f"sites {missing} were not reached in the base forward pass")
        tensors = [acts[s] for s in sites]
        estimates: dict[str, dict[str, torch.Tensor]] = {}
        clean: dict[str, float] = {}
        names = list(metrics)
        for i, name in enumerate(names):
            value = metrics[name](logits)
            if value.numel() != 1:
                raise ValueError(f"metric {name!r} must return a scalar, got shape "
                                 f"{tuple(value.shape)}")
            clean[name] = float(value.detach())
            grads = torch.autograd.grad(value, tensors, retain_graph=i < len(names) - 1,
                                        allow_unused=True)
            per_site = {}
            for site, act, grad in zip(sites, tensors, grads):
                if grad is None:  # the metric does not depend on this site
                    grad = torch.zeros_like(act)
                dtype = torch.promote_types(act.dtype, torch.float32)  # fp32 at least
                delta = src_cache[site].to(dtype) - base_cache[site].to(dtype)
                per_site[site] = (delta * grad.to(dtype)).flatten(2).sum(-1)[0]
            estimates[name] = per_site
    delta_norm = {s: (src_cache[s].double() - base_cache[s].double()).flatten(2)
                  .norm(dim=-1)[0] for s in sites}
    return estimates, delta_norm, clean


def correlations(exact: Sequence[float], estimate: Sequence[float]) -> dict:
    """Pearson and Spearman correlation of two equally long lists (None where undefined)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(exact, dtype=float)
    y = np.asarray(estimate, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"lists differ in length: {x.shape} vs {y.shape}")
    out: dict[str, float | None] = {"n": int(x.size), "pearson": None, "spearman": None}
    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        out["pearson"] = float(stats.pearsonr(x, y)[0])
        out["spearman"] = float(stats.spearmanr(x, y)[0])
    return out
