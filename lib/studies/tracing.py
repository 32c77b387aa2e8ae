"""Causal tracing: corrupt the subject with noise, restore clean states, measure p(answer).

The method of Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME,
arXiv 2202.05262), as packaged by ``chanind/causal-tracer`` (v1.1.0). Three runs:

1. **clean**: the prompt as is. The answer is the clean greedy top-1 token (or a given one);
   ``p_clean`` is its probability at the last position.
2. **corrupted**: Gaussian noise ``nu * N(0, 1)`` is added to the token embeddings of the subject
   (the ``embed`` site; Gemma's embedding output is already scaled by sqrt(d_model), so the noise
   is added after that scaling). ``p_corrupt`` is the mean over ``samples`` noise draws.
3. **restored**: corrupted, but some clean states are copied back in. ``"hidden"`` restores the
   residual stream after block L (``blocks.L.resid_post``) at token t; ``"mlp"`` / ``"attention"``
   restore ``mlp_out`` / ``attn_out`` at token t for a *window* of layers
   ``range(max(0, L - w // 2), min(n_layers, L + ceil(w / 2)))`` (ROME's code; the paper text says
   L-4..L+5). The score is the mean restored p(answer); its indirect effect is
   ``IE = p_restored - p_corrupt``; the total effect is ``TE = p_clean - p_corrupt``.

Noise draws are *common random numbers*: ``numpy.random.RandomState(seed).randn(samples,
n_subject_tokens, d_model)``, the same draws for every restoration (as ROME and causal-tracer),
so a seed fixes the whole trace. The noise scale ``nu`` follows one of three rules
(:func:`noise_level`): ``"auto"`` = 3 x std of the whole embedding matrix (causal-tracer),
``"subject"`` = 3 x std of the subject tokens' embeddings (ROME's "s3"), or a number.

The *severed* trace (ROME Fig. 2 right, ``trace_with_repatch``) restores the hidden state at
(t, L) while holding the MLP (or attention) outputs at token t, in every layer, at their values
in the corrupted run *with the same noise draw* (ROME drew fresh noise in its second pass; see
``methods.md`` 3.3 item 3).

Speed: every (restoration, noise sample) pair is one row on the intervention engine
(:mod:`lib.core.engine`); each noise sample is a context, run once with its noise. A restoration at
token t cannot change positions before t, so a row starts at t on the key/value cache of its
sample's *corrupted* prefix ``[0, t)``, and at its lowest restored layer from the sample's
stored residual stream (where that is exact); only the last position's logits are computed.

Traces over a fact set (ROME's averages, one resumable unit per fact):
:mod:`lib.studies.tracing_facts`. Figures of the traces: :mod:`lib.plots.tracing`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.core.engine import Capture, Context, Engine, Ref, Row, run_naive
from lib.core.interventions import Intervention
from lib.core.hooks import capture
from lib.core.sites import site_name

TRACE_KINDS = ("hidden", "mlp", "attention")
KIND_SITE = {"hidden": "resid_post", "mlp": "mlp_out", "attention": "attn_out"}
DEFAULT_WINDOW = {"hidden": 1, "mlp": 10, "attention": 10}
SEVER_KINDS = ("mlp", "attention")


class SubjectNotFoundError(ValueError):
    """The subject string does not occur in the prompt."""


# --- small rules ----------------------------------------------------------------------------

def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored together for a window centred on ``layer`` (ROME's code):
    ``range(max(0, layer - window // 2), min(n_layers, layer + ceil(window / 2)))``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside 0..{n_layers - 1}")
    return list(range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2))))


def subject_token_range(lm, prompt: str, subject: str) -> tuple[int, int]:
    """Token range ``(start, end)`` (end exclusive) of the *last* occurrence of ``subject`` in
    ``prompt``: every token whose characters overlap the subject's. Raises
    :class:`SubjectNotFoundError` if the subject is not an exact substring."""
    if not subject or not subject.strip():
        raise SubjectNotFoundError("the subject is empty; give the words of the prompt to corrupt")
    char = prompt.rfind(subject)
    if char < 0:
        raise SubjectNotFoundError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; it must be an exact "
            "substring (same case, spacing and punctuation) of the prompt")
    end_char = char + len(subject)
    enc = lm.tokenizer(prompt, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = enc.get("offset_mapping")
    if offsets is None:  # slow tokenizer: rebuild the spans from decoded pieces
        spans, pos = [], 0
        for piece in lm.token_strings(ids):
            found = prompt.find(piece, pos) if piece else -1
            spans.append((found, found + len(piece)) if found >= 0 else (pos, pos))
            pos = spans[-1][1]
        offsets = spans
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end_char and e > char]
    if not hits:
        raise SubjectNotFoundError(f"no token of {prompt!r} covers the subject {subject!r}")
    return hits[0], hits[-1] + 1


def answer_token_id(lm, answer: str) -> int:
    """The first token of ``answer`` as a continuation (no special tokens), e.g. " Paris"."""
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    if not ids:
        raise ValueError(f"answer {answer!r} gives no token; leave it empty to use the model's "
                         "own top-1 token")
    return int(ids[0])


def make_noise(samples: int, n_tokens: int, d_model: int, seed: int) -> np.ndarray:
    """Standard normal draws ``RandomState(seed).randn(samples, n_tokens, d_model)`` (float64),
    exactly as ROME and causal-tracer draw them."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return np.random.RandomState(seed).randn(samples, n_tokens, d_model)


@torch.no_grad()
def embedding_std(lm, chunk: int = 8192) -> float:
    """Std (ddof=1, float64) of the ``embed`` site's output over the whole vocabulary, i.e. of
    the embedding matrix times the module's own scale (sqrt(d_model) for Gemma, 1 otherwise)."""
    module = lm.model.get_submodule(lm.spec.embed_path)
    weight = module.weight
    probe = torch.arange(min(64, weight.shape[0]), device=weight.device)
    raw = weight[probe].double()
    scale = float((module(probe).double() * raw).sum() / (raw * raw).sum())
    n = weight.numel()
    total = sum(float(weight[i:i + chunk].double().sum()) for i in range(0, weight.shape[0], chunk))
    mean = total / n
    sq = sum(float(((weight[i:i + chunk].double() - mean) ** 2).sum())
             for i in range(0, weight.shape[0], chunk))
    return abs(scale) * math.sqrt(sq / (n - 1))


@torch.no_grad()
def subject_embedding_std(lm, pairs: Iterable[tuple[str, str]]) -> float:
    """Std (ddof=1, float64) of the ``embed`` site's output at the subject tokens of each
    (prompt, subject) pair, all tokens pooled (ROME's rule, taken in context)."""
    rows = []
    for prompt, subject in pairs:
        s0, s1 = subject_token_range(lm, prompt, subject)
        ids = lm.tokenize(prompt)
        with capture(lm, ["embed"], positions=list(range(s0, s1))) as cache:
            lm.model.get_submodule(lm.spec.embed_path)(ids)
        rows.append(cache["embed"][0].double().reshape(-1))
    if not rows:
        raise ValueError("noise rule 'subject' needs at least one (prompt, subject) pair")
    return float(torch.cat(rows).std())


def noise_level(lm, rule: str | float = "auto", pairs: Iterable[tuple[str, str]] = (),
                multiplier: float = 3.0) -> float:
    """The noise scale nu. ``"auto"``: ``multiplier`` x std of the whole embedding matrix (as
    causal-tracer's ``pick_noise_level``, but of the embedding *output*, so Gemma's sqrt(d)
    scale is included); ``"subject"``: ``multiplier`` x std of the subject-token embeddings of
    ``pairs`` (ROME's "s3"); a number (or numeric string): that nu."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        value = float(rule)
    elif isinstance(rule, str) and rule.strip().lower() == "auto":
        return multiplier * embedding_std(lm)
    elif isinstance(rule, str) and rule.strip().lower() == "subject":
        return multiplier * subject_embedding_std(lm, pairs)
    else:
        try:
            value = float(rule)
        except (TypeError, ValueError):
            raise ValueError(f"unknown noise rule {rule!r}; use 'auto', 'subject' or a number "
                             "such as 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"noise level must be a finite number >= 0, got {value}")
    return value


# --- restorations as data --------------------------------------------------------------------

State = tuple[str, int, int]  # (site kind such as "resid_post", layer, token)


@dataclass(frozen=True)
class Restoration:
    """One corrupted run with some states changed, as data.

    ``restore``: states copied back from the clean run. ``freeze``: states held at their value
    in the corrupted run with the same noise draw (the severed trace). Site kinds are those of
    :mod:`lib.core.sites` (``resid_post``, ``mlp_out``, ``attn_out``, ...).
    """

    restore: tuple[State, ...] = ()
    freeze: tuple[State, ...] = ()

    def __post_init__(self):
        both = {(k, l, t) for k, l, t in self.restore} & {(k, l, t) for k, l, t in self.freeze}
        if both:
            raise ValueError(f"states {sorted(both)} are both restored and frozen")

    @property
    def tokens(self) -> set[int]:
        return {t for _, _, t in self.restore + self.freeze}


def grid_restorations(kind: str, n_layers: int, tokens: Sequence[int], layers: Sequence[int],
                      window: int) -> list[Restoration]:
    """One restoration per (token, centre layer), token-major: ``kind`` restored at that token
    for the window of layers around the centre."""
    if kind not in KIND_SITE:
        raise ValueError(f"unknown trace kind {kind!r}; use one of {TRACE_KINDS}")
    site = KIND_SITE[kind]
    return [Restoration(restore=tuple((site, l, t) for l in window_layers(layer, window, n_layers)))
            for t in tokens for layer in layers]


def severed_restorations(token: int, n_layers: int, layers: Sequence[int],
                         sever: str | None) -> list[Restoration]:
    """Hidden state restored at (token, L) for each L, with the ``sever`` kind's outputs at
    ``token`` frozen at their corrupted values in every layer (``None``: nothing frozen)."""
    freeze = () if sever is None else tuple((KIND_SITE[sever], l, token) for l in range(n_layers))
    return [Restoration(restore=(("resid_post", layer, token),), freeze=freeze) for layer in layers]


# --- the tracer --------------------------------------------------------------------------------

@dataclass
class TraceResult:
    """One causal-trace grid (tokens x layers) and everything needed to read it."""

    kind: str
    window: int
    scores: np.ndarray                 # (n_tokens, n_layers) restored p(answer); NaN = not run
    p_clean: float
    p_corrupt: float
    answer: str
    answer_id: int
    tokens: list[str]
    subject_range: tuple[int, int]
    noise: float
    samples: int
    seed: int
    prompt: str = ""
    subject: str = ""
    layers: list[int] = field(default_factory=list)       # centre layers that were run
    token_rows: list[int] = field(default_factory=list)   # token rows that were run
    prefix_rows: list[int] = field(default_factory=list)  # rows before the subject: = p_corrupt

    def peak(self) -> dict:
        """The cell where restoring helps most: p_restored, indirect effect, token, layer."""
        t, l = divmod(int(np.nanargmax(self.scores)), self.scores.shape[1])
        return {"kind": self.kind, "window": self.window, "peak p_restored": self.scores[t, l],
                "peak IE": self.scores[t, l] - self.p_corrupt, "token": t,
                "token_str": self.tokens[t], "layer": l}

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "window": self.window, "prompt": self.prompt,
            "subject": self.subject, "answer": self.answer, "answer_id": self.answer_id,
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "noise": self.noise,
            "samples": self.samples, "seed": self.seed, "tokens": self.tokens,
            "subject_range": list(self.subject_range), "layers": self.layers,
            "token_rows": self.token_rows, "prefix_rows": self.prefix_rows,
            "scores": [[None if math.isnan(v) else float(v) for v in row] for row in self.scores],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        scores = np.array([[np.nan if v is None else v for v in row] for row in data["scores"]],
                          dtype=float)
        keys = ("kind", "window", "p_clean", "p_corrupt", "answer", "answer_id", "tokens",
                "noise", "samples", "seed", "prompt", "subject", "layers", "token_rows",
                "prefix_rows")
        return cls(scores=scores, subject_range=tuple(data["subject_range"]),
                   **{k: data[k] for k in keys})


class CausalTracer:
    """Clean run, corrupted runs and batched restorations for one prompt, on :mod:`lib.core.engine`.

    Contexts: 0 is the clean prompt; 1 + s is the prompt with noise draw s added to the
    subject's embeddings. A restoration on sample s is a row on context 1 + s whose
    interventions replace states with the clean context's (restore) or with its own context's
    (freeze: the corrupted run with the same noise draw), both as references the engine reads
    from the stored context runs. ``answer=""`` uses the clean greedy top-1 token. ``noise`` is
    nu (see :func:`noise_level`).
    """

    CLEAN_SITES = ("resid_post", "mlp_out", "attn_out")

    @torch.no_grad()
    def __init__(self, lm, prompt: str, subject: str, answer: str = "", noise: float = 0.1,
                 samples: int = 10, seed: int = 1):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.lm, self.prompt, self.subject = lm, prompt, subject
        self.noise, self.samples, self.seed = float(noise), int(samples), int(seed)
        self.ids = lm.tokenize(prompt)
        self.n_tokens = self.ids.shape[1]
        self.tokens = lm.token_strings(self.ids[0])
        self.subject_range = s0, s1 = subject_token_range(lm, prompt, subject)
        draws = make_noise(self.samples, s1 - s0, lm.d_model, self.seed) * self.noise
        self.noise_draws = torch.from_numpy(draws).to(lm.device, lm.dtype)
        contexts = [Context(self.ids, name="clean")]
        for s in range(self.samples):
            ivs = [] if self.noise == 0 else [Intervention(
                "embed", positions=tuple(range(s0, s1)), kind="add",
                value=self.noise_draws[s][None], source=f"noise nu={self.noise:.6g} "
                                                         f"seed={self.seed} sample {s}")]
            contexts.append(Context(self.ids, ivs, name=f"corrupted {s}"))
        self.engine = Engine(lm, contexts)
        logits = self.engine.clean_readout(0)
        probs = logits.softmax(-1)
        self.top_id = int(logits.argmax())
        self.answer_id = answer_token_id(lm, answer) if answer else self.top_id
        self.answer = lm.tokenizer.decode([self.answer_id])
        self.top_token = lm.tokenizer.decode([self.top_id])
        self.p_clean = float(probs[self.answer_id])
        self._p_corrupt_rows = torch.stack([
            self.engine.clean_readout(1 + s, self._readout) for s in range(self.samples)])

    def _readout(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)[:, self.answer_id].double()

    # -- the clean and corrupted runs --------------------------------------------------------

    @property
    def correct(self) -> bool:
        """Whether the clean greedy top-1 token is the answer."""
        return self.top_id == self.answer_id

    @property
    def p_corrupt(self) -> float:
        """Mean p(answer) over the noise samples with nothing restored."""
        return float(self._p_corrupt_rows.mean())

    def _states(self, ctx: int) -> dict[str, torch.Tensor]:
        sites = tuple(site_name(k, l) for k in self.CLEAN_SITES for l in range(self.lm.n_layers))
        return self.engine.clean_readout(ctx, Capture(sites))

    @property
    def clean(self) -> dict[str, torch.Tensor]:
        """Activations of the clean run: site -> (n_tokens, d)."""
        return self._states(0)

    @property
    def corrupted(self) -> dict[str, torch.Tensor]:
        """Activations of the corrupted runs: site -> (samples, n_tokens, d)."""
        per = [self._states(1 + s) for s in range(self.samples)]
        return {site: torch.stack([p[site] for p in per]) for site in per[0]}

    # -- running restorations ----------------------------------------------------------------

    def _rows(self, jobs: Sequence[Restoration]) -> list[Row]:
        """One engine row per (job, noise sample), job-major."""
        rows = []
        # ignore[arg-type]: a Ref value, resolved by the engine (Intervention.value says Tensor)
        for job in jobs:
            for s in range(self.samples):
                ivs = [Intervention(site_name(k, l), positions=(t,),
                                    value=Ref(0, site_name(k, l)),
                                    source="clean run") for k, l, t in job.restore]
                ivs += [Intervention(site_name(k, l), positions=(t,),
                                     value=Ref(1 + s, site_name(k, l)),
                                     source="corrupted run, same noise") for k, l, t in job.freeze]
                rows.append(Row(1 + s, ivs))
        return rows

    def _check(self, jobs: Sequence[Restoration]):
        for job in jobs:
            for kind, layer, tok in job.restore + job.freeze:
                if kind not in self.CLEAN_SITES or not 0 <= layer < self.lm.n_layers:
                    raise ValueError(f"site {site_name(kind, layer)!r} is not recorded; restore "
                                     f"or freeze one of {self.CLEAN_SITES} at layers "
                                     f"0..{self.lm.n_layers - 1}")
                if not 0 <= tok < self.n_tokens:
                    raise ValueError(f"token {tok} is outside the prompt (0..{self.n_tokens - 1})")

    def _mean(self, per_row: torch.Tensor, n_jobs: int) -> np.ndarray:
        flat = per_row.double().cpu().numpy().reshape(n_jobs, self.samples)
        out = np.zeros(n_jobs)
        for s in range(self.samples):  # summed in sample order, then divided
            out += flat[:, s]
        return out / self.samples

    @torch.no_grad()
    def scores(self, jobs: Sequence[Restoration], batch_size: int = 32,
               progress: bool = False) -> np.ndarray:
        """Mean restored p(answer) over the noise samples, one per job (float64 array).

        Rows are (job, sample) pairs on the engine, ``batch_size`` per forward pass; each row
        runs only from the first token its job touches, on its sample's corrupted key/value
        prefix. A job that changes nothing (e.g. restoring a token before the subject, which
        the noise cannot reach) gets p_corrupt of its sample without running.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        jobs = list(jobs)
        self._check(jobs)
        return self._mean(self.engine.run(self._rows(jobs), self._readout, batch_size=batch_size,
                                          progress=progress), len(jobs))

    @torch.no_grad()
    def scores_naive(self, jobs: Sequence[Restoration], progress: bool = False) -> np.ndarray:
        """Reference: one full, unbatched forward per (job, sample) (:func:`lib.core.engine.run_naive`),
        frozen values from unbatched corrupted runs. For tests and benchmarks."""
        jobs = list(jobs)
        self._check(jobs)
        return self._mean(run_naive(self.lm, self.engine.contexts, self._rows(jobs),
                                    self._readout), len(jobs))

    # -- grids ---------------------------------------------------------------------------------

    def token_rows(self, subject_tokens_only: bool = False) -> list[int]:
        s0, s1 = self.subject_range
        return list(range(s0, s1)) if subject_tokens_only else list(range(s0, self.n_tokens))

    def trace(self, kind: str = "hidden", window: int | None = None,
              tokens: Sequence[int] | None = None, layers: Sequence[int] | None = None,
              batch_size: int = 32, progress: bool = False, naive: bool = False) -> TraceResult:
        """The (tokens x layers) grid of restored p(answer) for one kind.

        ``tokens`` default: every token from the subject's first on. Rows before the subject
        are not run: the noise cannot reach them, so restoring them changes nothing and their
        score is p_corrupt (listed in ``prefix_rows``). Cells not run (``tokens`` / ``layers``
        restricted) are NaN.
        """
        window = DEFAULT_WINDOW[kind] if window is None else int(window)
        n_layers = self.lm.n_layers
        tokens = self.token_rows() if tokens is None else [int(t) for t in tokens]
        layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside 0..{n_layers - 1}")
        jobs = grid_restorations(kind, n_layers, tokens, layers, window)
        flat = self.scores_naive(jobs) if naive else self.scores(jobs, batch_size, progress)
        grid = np.full((self.n_tokens, n_layers), np.nan)
        grid[np.ix_(tokens, layers)] = flat.reshape(len(tokens), len(layers))
        prefix = list(range(self.subject_range[0]))
        grid[prefix] = self.p_corrupt
        return TraceResult(kind=kind, window=window, scores=grid, p_clean=self.p_clean,
                           p_corrupt=self.p_corrupt, answer=self.answer,
                           answer_id=self.answer_id, tokens=self.tokens,
                           subject_range=self.subject_range, noise=self.noise,
                           samples=self.samples, seed=self.seed, prompt=self.prompt,
                           subject=self.subject, layers=layers, token_rows=tokens,
                           prefix_rows=prefix)

    def severed(self, token: int | None = None, layers: Sequence[int] | None = None,
                batch_size: int = 32, progress: bool = False) -> dict:
        """Hidden-state restoration at ``token`` (default: last subject token) for each layer:
        ordinary, with every MLP output at that token frozen at its corrupted value, and with
        every attention output frozen. Returns curves of restored p(answer) per layer."""
        token = self.subject_range[1] - 1 if token is None else int(token)
        n_layers = self.lm.n_layers
        layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
        names = {None: "ordinary", "mlp": "mlp_severed", "attention": "attention_severed"}
        jobs = [job for sever in names for job in severed_restorations(token, n_layers, layers,
                                                                      sever)]
        flat = self.scores(jobs, batch_size, progress).reshape(len(names), len(layers))
        out = {"token": token, "token_str": self.tokens[token], "layers": layers,
               "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "noise": self.noise,
               "answer": self.answer, "answer_id": self.answer_id}
        out.update({name: flat[i].tolist() for i, name in enumerate(names.values())})
        return out
