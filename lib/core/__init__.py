"""The machinery every study shares.

* :mod:`lib.core.sites`: one site vocabulary (``embed``, ``blocks.{layer}.{kind}``) and one table
  row per architecture.
* :mod:`lib.core.hooks`: the only code that writes or reads an activation (``with`` blocks).
* :mod:`lib.core.engine`: which rows run, in which batches, from which stored state.
* :mod:`lib.core.models`: offline loading of the embedded models by short name.
* :mod:`lib.core.activations`: last-token activations of many prompts, as engine captures.
* :mod:`lib.core.params`, :mod:`lib.core.paths`, :mod:`lib.core.io`: notebook parameters, the
  repository's folders, result files (provenance, atomic writes, load-or-compute).
* :mod:`lib.core.schema`: the kinds of result file, each with a declared shape checked on every
  read, so that another notebook's result is never taken (or set aside) for this one's.
* :mod:`lib.core.prompts`, :mod:`lib.core.stats`: paired prompt files; seeded statistics.
"""
