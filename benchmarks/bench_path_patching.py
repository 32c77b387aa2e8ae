"""Benchmark: path patching batched on the engine against one forward pass per path / edge set.

    python benchmarks/bench_path_patching.py                          # smollm2-135m
    python benchmarks/bench_path_patching.py --n-edge-sets 1000 --threads 1

In one process, on the first IOI pair of ``prompt_set/ioi.json``:

* every head -> logits path (Wang et al., freeze policy "attention"):
  :func:`lib.studies.path_patching.path_patch` (position-local: the last position's stream, MLPs
  only) vs the engine's reference loop (``naive=True``: one full unbatched forward per path,
  each run it reads once), and, for the record, the same rows on the batched engine
  (``local=False``);
* ``--n-edge-sets`` random sets of node-level edges, each patched in one forward pass,
  batched (:func:`lib.studies.path_patching.edge_patch`) vs one unbatched forward per edge set;

printing the times, the ratio and the largest differences in last-position probabilities and
logits, and writing ``benchmarks/results/<--out>``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lib.studies import interchange, ioi
from lib.studies import path_patching as pp
from lib.core.models import load_model


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def differences(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest differences in last-position probabilities and logits."""
    return {"max_prob_diff": float((got.softmax(-1) - ref.softmax(-1)).abs().max()),
            "max_abs_diff": float((got - ref).abs().max())}


def forward_flops(lm, tokens: int) -> float:
    """Floating-point operations of one forward pass of ``tokens`` tokens with logits at the last
    position: 2 per multiply-add of every weight matrix but the embedding, the attention
    scores and mixing (2 x 2 x tokens^2 x n_heads x d_head per layer), and the unembedding."""
    embed = lm.model.get_input_embeddings().weight
    unembed = lm.model.get_output_embeddings().weight
    matrices = sum(p.numel() for n, p in lm.model.named_parameters()
                   if p.dim() == 2 and p.data_ptr() not in (embed.data_ptr(), unembed.data_ptr()))
    attention = 4 * tokens * tokens * lm.n_heads * lm.d_head * lm.n_layers
    return 2.0 * matrices * tokens + attention + 2.0 * unembed.numel()


def matmul_peak(lm, rows: int, repeats: int = 50) -> float:
    """GFLOP/s of this CPU on the model's largest matrix shape (``rows`` x d_model times the
    biggest weight matrix of a block): the arithmetic bound of a batched forward."""
    weight = max((p for p in lm.spec.blocks(lm.model)[0].parameters() if p.dim() == 2),
                 key=lambda p: p.numel()).detach()
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    torch.nn.functional.linear(x, weight)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
    return 2.0 * rows * weight.numel() * repeats / (time.perf_counter() - started) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-edge-sets", type=int, default=1000)
    parser.add_argument("--density", type=float, default=0.05,
                        help="probability that an edge is in a random set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="path_patching.json",
                        help="file name under benchmarks/results/")
    args = parser.parse_args(argv)
    interchange.set_threads(args.threads)
    lm = load_model(args.model)
    pair = ioi.aligned_pairs(lm, ioi.load_ioi())[0]
    b, s = pair["base_ids"], pair["source_ids"]
    results = {"model": lm.name, "tokens": int(b.shape[1]), "threads": args.threads,
               "batch_size": args.batch_size}

    specs = [dict(senders=[h]) for h in pp.all_heads(lm)]
    fast, t_fast = timed(lambda: pp.path_patch(lm, b, s, specs, batch_size=args.batch_size))
    rows, t_rows = timed(lambda: pp.path_patch(lm, b, s, specs, batch_size=args.batch_size,
                                               local=False))
    slow, t_slow = timed(lambda: pp.path_patch(lm, b, s, specs, naive=True))
    results["head_to_logits"] = {"n": len(specs), "batched_s": t_fast, "naive_s": t_slow,
                                 "ratio": t_slow / t_fast, **differences(fast, slow),
                                 "engine_rows_s": t_rows, "engine_rows_ratio": t_slow / t_rows,
                                 "engine_rows_max_prob_diff":
                                     differences(rows, slow)["max_prob_diff"]}

    g = torch.Generator().manual_seed(args.seed)
    edges = pp.node_edges(lm)
    sets = [[e for e, m in zip(edges, torch.rand(len(edges), generator=g) < args.density) if m]
            for _ in range(args.n_edge_sets)]
    fast, t_fast = timed(lambda: pp.edge_patch(lm, b, s, sets, batch_size=args.batch_size))
    slow, t_slow = timed(lambda: pp.edge_patch(lm, b, s, sets, naive=True))
    results["edge_sets"] = {"n": len(sets), "n_edges": len(edges), "density": args.density,
                            "batched_s": t_fast, "naive_s": t_slow, "ratio": t_slow / t_fast,
                            **differences(fast, slow)}
    flops = forward_flops(lm, int(b.shape[1]))
    peak = matmul_peak(lm, args.batch_size * int(b.shape[1]))
    one_row = matmul_peak(lm, int(b.shape[1]))
    r = results["edge_sets"]
    r.update(gflop_per_forward=flops / 1e9, batched_gflop_s=len(sets) * flops / t_fast / 1e9,
             naive_gflop_s=len(sets) * flops / t_slow / 1e9, peak_gflop_s=peak,
             one_row_peak_gflop_s=one_row,
             bound=peak / (len(sets) * flops / t_slow / 1e9))
    print(f"edge sets: {flops / 1e9:.2f} GFLOP per forward; batched {r['batched_gflop_s']:.1f} "
          f"GFLOP/s, naive {r['naive_gflop_s']:.1f}; matmul peak {peak:.1f} GFLOP/s at "
          f"{args.batch_size} rows ({one_row:.1f} at one row): batching can give at most "
          f"{r['bound']:.1f}x over the naive loop")
    for name in ("head_to_logits", "edge_sets"):
        r = results[name]
        print(f"{name}: {r['n']} rows  batched {r['batched_s']:.2f} s  naive {r['naive_s']:.2f} s"
              f"  ratio {r['ratio']:.1f}x  max |diff| probability {r['max_prob_diff']:.2e}, "
              f"logits {r['max_abs_diff']:.2e}")
    r = results["head_to_logits"]
    print(f"head_to_logits on the engine's rows (local=False): {r['engine_rows_s']:.2f} s, "
          f"{r['engine_rows_ratio']:.1f}x")
    out = Path(__file__).resolve().parent / "results" / Path(args.out).name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
