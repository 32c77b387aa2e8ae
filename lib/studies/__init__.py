"""One module or package per technique, each built on :mod:`lib.core`; notebooks call these.

* :mod:`lib.studies.separability` (00), :mod:`lib.studies.domain_swap` (01-03),
  :mod:`lib.studies.explorer` (04): the seed study's domain separation and swaps.
* :mod:`lib.studies.interchange` and :mod:`lib.studies.attribution` (05): interchange
  intervention over components x layers x positions; attribution patching.
* :mod:`lib.studies.tracing` (06): causal tracing.
* :mod:`lib.studies.path_patching` and :mod:`lib.studies.ioi` (07): path, tree and edge patching.
* :mod:`lib.studies.das` (08, 09): distributed alignment search.
* :mod:`lib.studies.steps`: the compute step of the notebooks 00-02 and 05-07.
"""
