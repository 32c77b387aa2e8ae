"""Benchmark: one DAS training step of notebook 09 from the stored residual stream vs the full
forward + backward pass that pyvene's algorithm runs.

    python benchmarks/bench_das_arithmetic.py --layers 0,14,28 --batch-size 64

Both sides run in this process, on the same model (a 28-way head attached; its weights do not
matter for timing), the same counterfactual batch and the same rotation (rank k at
``blocks.l.resid_post``, shared over all positions):

* ``full``: pyvene's algorithm: a no-grad forward of the sources up to the site, then a forward
  of the bases from the token ids through every block with the rotation applied by a hook
  (``lib.core.hooks.patch``), the loss, its backward and an Adam step;
* ``stored``: ``lib.studies.das.arithmetic_das``: the site activations of bases and sources read from the
  stored table, only blocks l+1.. run (``run_from``), the loss, backward and an Adam step.

Prints both times per step (the fastest of ``--repeats``), the ratio and the largest
difference between the two losses and rotation gradients, and writes them to
``benchmarks/results/das_arithmetic.json``. Not a test.

Evaluation (``--eval-pairs`` counterfactuals of test arrangements, M7 labels, the same
rotation): ``lib.studies.das.iia`` with one whole run of the blocks above l per counterfactual, batches
of 250, against ``lib.studies.das.arithmetic_das.shared_iia``, which runs the first positions that
counterfactuals share once; both times, the ratio and how many predictions differ.
"""

from __future__ import annotations

import argparse

import torch

from _common import timed, write_result
from lib.studies.das import arithmetic as ar
from lib.studies import das
from lib.studies.das import arithmetic_das as da
from lib.core.hooks import capture, patch
from lib.core.models import load_model
from lib.core.parsers import parse_layers


def evaluation(lm, layer, module, states, pairs) -> dict:
    data = da.pairs_data(states, pairs)
    head = da.head_at(lm, layer)

    @torch.no_grad()
    def whole():
        return torch.cat([head(module(*data.batch(slice(a, a + 250))[:3])).argmax(-1)
                          for a in range(0, len(data), 250)])

    pred_whole, t_whole = timed(whole)
    pred_shared, t_shared = timed(lambda: da.counterfactual_predictions(
        lm, layer, module, states, pairs["base"], pairs["source"]))
    labels = pairs["label"]
    return {"eval_whole_s": t_whole, "eval_shared_s": t_shared, "eval_ratio": t_whole / t_shared,
            "eval_iia_whole": float((pred_whole == labels).double().mean()),
            "eval_iia_shared": float((pred_shared == labels).double().mean()),
            "eval_predictions_differing": int((pred_whole != pred_shared).sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,14,28")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-pairs", type=int, default=1000,
                        help="test counterfactuals of the evaluation comparison (0 skips it)")
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
    test_pairs = ar.counterfactual_pairs(ar.causal_model(7, ar.split_arrangements(0)["test"]),
                                         max(args.eval_pairs, 1), seed=27)
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
        print(f"layer {layer:2d}: full forward+backward {row['full_s']:.2f} s, from stored "
              f"state {row['stored_s']:.2f} s, ratio {row['ratio']:.2f}; loss diff "
              f"{row['loss_diff']:.2e}, grad diff {row['grad_max_diff']:.2e} "
              f"(max |grad| {row['grad_max']:.2e})", flush=True)
        if args.eval_pairs:
            row.update(evaluation(lm, layer, module, states[layer], test_pairs))
            print(f"          evaluation of {args.eval_pairs} counterfactuals: whole runs "
                  f"{row['eval_whole_s']:.2f} s, shared first positions "
                  f"{row['eval_shared_s']:.2f} s, ratio {row['eval_ratio']:.2f}; IIA "
                  f"{row['eval_iia_whole']:.3f} / {row['eval_iia_shared']:.3f}, predictions "
                  f"differing: {row['eval_predictions_differing']}", flush=True)
        rows.append(row)
    write_result("das_arithmetic", {"model": args.model, "rank": args.rank,
                                    "batch_size": args.batch_size, "repeats": args.repeats,
                                    "eval_pairs": args.eval_pairs,
                                    "stored_states_s": t_states, "layers": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
