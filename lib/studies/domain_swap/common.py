"""The domain-swap study's vocabulary: components, sides, effects, and its missing-file errors; see
:mod:`lib.studies.domain_swap`.
"""

from __future__ import annotations

COMPONENTS = ("attn_out", "mlp_out")
SIDES = ("b_into_a", "a_into_b")
SIDE_DOC = {"b_into_a": "base = domain-A prompt, last-token output replaced by the paired "
                        "domain-B prompt's (injection: + alpha (mean_B - mean_A))",
            "a_into_b": "base = domain-B prompt, last-token output replaced by the paired "
                        "domain-A prompt's (injection: + alpha (mean_A - mean_B))"}
EFFECTS = ("kl", "abs_delta")
_BASE_OF = {"b_into_a": 0, "a_into_b": 1}  # index of the base domain


class TokenSetMissingError(FileNotFoundError):
    """No token set file for a model (notebook 01 has not been run for it)."""


class ScoresMissingError(FileNotFoundError):
    """No separability scores for a model, pair, component or metric (notebook 00)."""
