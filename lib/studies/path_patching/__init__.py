"""Path patching on any supported architecture, in three forms, on the intervention engine.

Path patching asks which *paths* through the computation graph carry an effect, not only which
components: a component's output may be taken from the source run along one path and from the
base run along another. The forms (DESIGN.md, "Path patching"):

1. **Tree patching** (nano-causal-interventions, A. Arora 2023; the path patching of
   Goldowsky-Dill et al. 2023): ``branch(path)`` says where the computation splits, ``which(path)``
   picks the input (0 = base, 1 = source, ...) each path starts from. :func:`tree_patch`.
2. **Sender -> receiver path patching** (Wang et al. 2022, "Interpretability in the Wild", the
   IOI circuit): senders patched from the source run, other components frozen at the base run,
   the receivers' inputs recomputed, then the base run with the receivers patched. The freeze
   policy is explicit: ``"attention"`` (Wang et al.: every attention head frozen, MLPs
   recompute) or ``"all"`` (pyvene's IOI tutorial: MLPs frozen too). :func:`path_patch`.
3. **Edge patching** (ACDC, Conmy et al. 2023; auto-circuit's one-pass masks): a receiver's
   input is the sum of its senders' outputs, so a set of edges (sender output -> receiver input)
   is patched exactly in one forward pass by adding ``source_out(s) - current_out(s)`` at each
   patched edge's receiver, ``current_out`` being the sender's output in that very pass; many
   edge sets run batched, one per row. :func:`edge_patch`. Overlapping edges add up: a set
   with an edge into ``a{l}`` and edges into ``a{l}.h{h}.q|k|v`` gives head ``h``'s query
   (key, value) input the already patched ``a{l}`` input plus its own edges' deltas. Edge attribution patching (Syed et
   al. 2023) estimates every edge at once from one forward and one backward pass: :func:`eap`.

Node vocabulary
---------------
``emb`` (token (+ position) embeddings: the residual stream entering block 0); ``a{l}`` and
``f{l}`` (the attention and MLP sub-layers of block ``l``; as tree-patching path elements they
are the residual stream *after* that sub-layer, as in nano); heads ``a{l}.h{h}`` and their query,
key and value inputs ``a{l}.h{h}.q`` / ``.k`` / ``.v``; ``logits`` (the final residual stream,
as a receiver). Tree paths also use nano's ``ln_final`` (root), ``a{l}.head`` / ``f{l}.head``
(the sub-layer term of a split node) and ``a{l}.head.pos{p}`` (its input at position p), and the
lineage tree labels the residual term ``a{l}.resid``.

Tree-patching semantics (nano's): requests go from the output down. At a node for which
``branch(path)`` is truthy, the residual term is requested with the path *without* the node and
the sub-layer term with it (``path + [node, node.head]``); at ``node.head``, ``"positions"``
requests the sub-layer's input separately per position (``.head.pos{p}``), and for attention
``"heads"`` (or True) requests it per head (``a{l}.h{h}``) and, where ``branch`` is truthy at
the head too, per query/key/value (``a{l}.h{h}.q``). An unbranched node keeps its name in the
path, as nano's code does today (one June 2023 version of nano dropped an unbranched MLP's
name). ``which(path)`` is called at ``emb``. Each request becomes a *run*: a context plus interventions at the sub-layer
inputs of the split nodes (pre-norm sites of :mod:`lib.core.sites`, so only that sub-layer reads the
other input), whose values are :class:`lib.core.engine.Ref` references to the runs of the sub-trees;
equal lineages give equal references, and the engine computes each distinct one once.

Computation modules import no plotting library; the lineage tree is drawn by
:mod:`lib.plots.path_patching`.

The package: :mod:`~lib.studies.path_patching.nodes` (the vocabulary),
:mod:`~lib.studies.path_patching.tree` (1), :mod:`~lib.studies.path_patching.paths` (2),
:mod:`~lib.studies.path_patching.edges` (3, EAP and EAP-IG), :mod:`~lib.studies.path_patching.roles`
(the IOI heads' roles from attention, direct logit attribution and copy scores),
:mod:`~lib.studies.path_patching.studies` (notebook 07's payloads),
:mod:`~lib.studies.path_patching.circuits` (circuits from ranked edges and their faithfulness
curves); every name is importable from here.
"""

from lib.studies.path_patching.nodes import (  # noqa: F401
    FREEZE_POLICIES, Lineage, _NODE_RE, Node, parse_node, all_heads, check_tree_node,
)
from lib.studies.path_patching.tree import (  # noqa: F401
    _Run, TreePatch, _TreeBuilder, tree_rows, tree_patch, node_position_patch, node_order,
    cumulative_patch, count_lineages, lineage_edges,
)
from lib.studies.path_patching.paths import (  # noqa: F401
    _receiver_site, _sender_groups, path_patch_row, path_patch, _first_difference, _is_local,
    local_logits,
)
from lib.studies.path_patching.edges import (  # noqa: F401
    _sender_site, _order, _head_weight, check_edge, _EdgeRow, edge_sender_sites, edge_rows,
    edge_patch, node_edges, eap,
)
from lib.studies.path_patching.studies import (  # noqa: F401
    _probs, capital_study, ioi_head_study, strongest_heads, eap_study, agreement, _corr,
    CAPITAL_SCHEMA, IOI_SCHEMA, EAP_SCHEMA,
)
from lib.studies.path_patching.roles import (  # noqa: F401
    ATTENTION_MIN, COPY_MIN, ROLES, ROLES_SCHEMA, frozen_norm, eager_attention, role_of,
    head_roles,
)
from lib.studies.path_patching.circuits import (  # noqa: F401
    DIRECTIONS, THRESHOLDS, CIRCUIT_SCHEMA, k_grid, edge_order, circuit_at, patched_sets,
    faithfulness_curve, curve_summary, circuit_study, smallest_circuit, area_intervals,
    area_difference,
)

#: notebook 07's result files (``full_compute/<model>/<name>.json``) and their kinds
RESULT_KINDS = {"path_patching_capital": CAPITAL_SCHEMA, "path_patching_ioi": IOI_SCHEMA,
                "path_patching_roles": ROLES_SCHEMA, "path_patching_eap": EAP_SCHEMA,
                "circuit_faithfulness": CIRCUIT_SCHEMA}
