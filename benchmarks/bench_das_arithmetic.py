"""Benchmark: one DAS training step of notebook 09 from the stored residual stream vs the full
forward + backward pass that pyvene's algorithm runs.

    python benchmarks/bench_das_arithmetic.py --layers 0,14,28 --batch-size 64

Both sides run in this process, on the same model (a 28-way head attached; its weights do not
matter for timing), the same counterfactual batch and the same rotation (rank k at
``blocks.l.resid_post``, shared over all positions):

* ``full``: pyvene's algorithm: a no-grad forward of the sources up to the site, then a forward
  of the bases from the token ids through every block with the rotation applied by a hook
  (``lib.hooks.patch``), the loss, its backward and an Adam step;
* ``stored``: ``lib.das_arithmetic``: the site activations of bases and sources read from the
  stored table, only blocks l+1.. run (``run_from``), the loss, backward and an Adam step.

Prints both times per step (the fastest of ``--repeats``), the ratio and the largest
difference between the two losses and rotation gradients, and writes them to
``benchmarks/results/das_arithmetic.json``. Not a test.
"""

from __future__ import annotations

import argparse

import torch

from _common import timed, write_result
from lib import arithmetic as ar
from lib import das, das_arithmetic as da
from lib.hooks import capture, patch
from lib.models import load_model
from lib.params import parse_layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,14,28")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    ar.attach_classifier(lm)
    tokens = ar.task_tokens(lm.tokenizer, "padded")
    layers = parse_layers(args.layers, lm.n_layers)
    pairs = ar.counterfactual_pairs(ar.causal_model(1), args.batch_size, seed=0)
    base_ids, src_ids = tokens.input_ids[pairs["base"]], tokens.input_ids[pairs["source"]]
    labels = pairs["label"]
    (states, t_states) = timed(lambda: da.residual_states(lm, tokens, layers))
    print(f"stored residual streams of {len(layers)} layers, 1,000 prompts: {t_states:.1f} s")
    rows = []
    for layer in layers:
        site = f"blocks.{layer}.resid_post"
        module = das.LowRankRotatedSpaceIntervention(lm.d_model, args.rank, seed=0)
        opt = torch.optim.Adam(module.parameters(), lr=0.0)   # lr 0: every repeat is the same step

        def full_step():
            with torch.no_grad(), capture(lm, [site]) as cache:
                lm.model(input_ids=src_ids, use_cache=False)
            src = cache[site]
            iv = das.hooks_intervention(module, site, src)
            with patch(lm, [iv]):
                logits = lm.model(input_ids=base_ids, use_cache=False).logits[:, -1].float()
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            grad = module.rotation.parametrizations.weight.original.grad.clone()
            opt.step()
            return float(loss), grad

        data = da.pairs_data(states[layer], pairs)
        head = da.head_at(lm, layer)

        def stored_step():
            b, s, m, y = data.batch(torch.arange(len(data)))
            loss = torch.nn.functional.cross_entropy(head(module(b, s, m)), y)
            opt.zero_grad()
            loss.backward()
            grad = module.rotation.parametrizations.weight.original.grad.clone()
            opt.step()
            return float(loss), grad

        full_times, stored_times = [], []
        for _ in range(args.repeats):
            (lf, gf), t = timed(full_step)
            full_times.append(t)
            (ls, gs), t = timed(stored_step)
            stored_times.append(t)
        row = {"layer": layer, "full_s": min(full_times), "stored_s": min(stored_times),
               "ratio": min(full_times) / min(stored_times), "loss_diff": abs(lf - ls),
               "grad_max_diff": float((gf - gs).abs().max()),
               "grad_max": float(gf.abs().max())}
        rows.append(row)
        print(f"layer {layer:2d}: full forward+backward {row['full_s']:.2f} s, from stored "
              f"state {row['stored_s']:.2f} s, ratio {row['ratio']:.2f}; loss diff "
              f"{row['loss_diff']:.2e}, grad diff {row['grad_max_diff']:.2e} "
              f"(max |grad| {row['grad_max']:.2e})", flush=True)
    write_result("das_arithmetic", {"model": args.model, "rank": args.rank,
                                    "batch_size": args.batch_size, "repeats": args.repeats,
                                    "stored_states_s": t_states, "layers": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
