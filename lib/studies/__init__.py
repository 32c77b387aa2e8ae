"""One module or package per technique, each built on :mod:`lib.core`; notebooks call these.

* :mod:`lib.studies.separability` (00), :mod:`lib.studies.domain_swap` (01-03),
  :mod:`lib.studies.explorer` (04): the seed study's domain separation and swaps.
* :mod:`lib.studies.interchange` and :mod:`lib.studies.attribution` (05): interchange
  intervention over components x layers x positions; attribution patching.
* :mod:`lib.studies.tracing` and :mod:`lib.studies.tracing_facts` (06): causal tracing; its
  averages over a fact set.
* :mod:`lib.studies.path_patching` and :mod:`lib.studies.ioi` (07): path, tree and edge patching.
* :mod:`lib.studies.das` (08, 09): distributed alignment search.
* :mod:`lib.studies.steps`: the compute step of the notebooks 00-02 and 05-07.
"""

from lib.core import schema as _schema

# the modules that declare the kinds of result files (lib.core.schema.Kind), beside the code
# that writes them: a file of any kind is recognised even where its module is not imported
_schema.declare_modules(
    "lib.studies.separability", "lib.studies.steps", "lib.studies.interchange",
    "lib.studies.path_patching.studies", "lib.studies.path_patching.roles",
    "lib.studies.das.mlp_study",
    "lib.studies.das.arithmetic_study", "lib.studies.das.arithmetic_graphs",
    "lib.studies.das.convergence")
