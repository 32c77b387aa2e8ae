"""Distributed alignment search (Geiger, Wu et al. 2023): the rotations and their two studies.

* :mod:`lib.studies.das.rotation`: rotated-subspace interchange interventions (full, low-rank,
  boundless), their training, IIA, random controls and storage. Its names are importable from
  this package (``from lib.studies import das; das.train_das(...)``).
* :mod:`lib.studies.das.causal_model`: high-level causal models and their counterfactual data.
* Notebook 08, small MLPs: :mod:`~lib.studies.das.mlp` (the networks),
  :mod:`~lib.studies.das.mlp_das` (the experiment steps), :mod:`~lib.studies.das.mlp_grid` (the
  wrong-model grid over networks), :mod:`~lib.studies.das.mlp_study` (the notebook's results).
* :mod:`lib.studies.das.scores`: IIA per label class, balanced IIA and the label shares.
* Notebook 09, a fine-tuned language model on the thesis' ``X+Y+Z=`` task:
  :mod:`~lib.studies.das.arithmetic` (task, causal models, the tuned model),
  :mod:`~lib.studies.das.arithmetic_das` (DAS wiring on the engine, evaluation, graphs),
  :mod:`~lib.studies.das.stacked` (several rotations at one layer trained in one pass),
  :mod:`~lib.studies.das.seeds` (cells over seeds, intervals, where a ranking may be read),
  :mod:`~lib.studies.das.convergence` (IIA against training budget; its training state on
  disk, to resume or go on: :mod:`~lib.studies.das.train_state`),
  :mod:`~lib.studies.das.arithmetic_study` (the notebook's results; its graphs:
  :mod:`~lib.studies.das.arithmetic_graphs`; its tables: :mod:`~lib.studies.das.arithmetic_tables`).
"""

from lib.studies.das.rotation import (  # noqa: F401
    KINDS, ORTHOGONAL_MAPS, SHUFFLES, BoundlessRotatedSpaceIntervention, DASError, InterchangeData,
    LowRankRotatedSpaceIntervention, RotatedSpaceIntervention, _RotatedBase, build,
    hooks_intervention, iia, orthogonality_error, random_control, random_rotation, train_das,
)
from lib.studies.das.rotation_files import load_intervention, save_intervention  # noqa: F401
