"""The reference's sampling, per request and batch-independent: guidance, repetition rule, top-k, draw.

Per step and per request, in this order (the reference's order under transformers 4.53.3):

1. logits of the last position, in float32;
2. guidance when ``intensity != 1.0``: ``uncond + intensity * (cond - uncond)``, where ``uncond``
   is the same prompt without its conditioning (``PromptPair.uncond``: an edit without its
   instruction, a clone without its speaker section), run as a second row of the same forward;
   1.0 is exactly the reference path (the second row is never built or run);
3. the repetition-aware rule (docs/model.md §3.4): over the last 10 ids of the sequence, prompt
   included, if the last id occurs at least twice, it is banned (``-inf``); no-op while the
   sequence is shorter than 10. The window is the conditional sequence's;
4. temperature 0.7, then top-k 50, softmax, ``torch.multinomial`` among the k candidates with
   the request's own ``torch.Generator`` (the distribution of transformers' warpers, see
   ``top_k_probs``; the random stream differs, the reference being unseeded anyway).
   ``do_sample=False`` takes the argmax after step 3 instead (tests, benchmarks).

Stopping (``llm.decode``): ``<|EOT|>`` (3), the reference's EOS, and also ``</s>`` (2), which the
reference would sample on through (a hardening, docs/model.md §3.5); or the prompt plus the
generated ids reaching ``max_length`` (8192, the reference's total-length limit), or
``max_new_tokens``.

Post-processing (``postprocess``) fixes the reference's bugs (docs/model.md §3.5): only a trailing
stop id is removed (a generation cut by the length limit keeps its last real token), and only
audio ids in [65536, 70656) are kept, as mixed codes 0..5119, instead of letting text ids turn
into code 0 or crash the vocoder's embedding.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from errors import InvalidInputError
from llm.prompts import PromptPair
from llm.text_tokenizer import AUDIO_ID_END, AUDIO_ID_OFFSET, EOS_ID, EOT_ID

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
DEFAULT_MAX_LENGTH = 8192  # prompt + generated ids, as the reference's generate(max_length=8192)
STOP_IDS = (EOT_ID, EOS_ID)
REPETITION_WINDOW = 10
REPETITION_MIN_COUNT = 2  # the reference's count / 10 > 0.1 (float32), i.e. at least 2 of 10
MIN_INTENSITY = 0.1
MAX_INTENSITY = 3.0


class Ending(enum.Enum):
    """Why a generation ended: its stop id, a length limit (the audio is cut short), or its caller."""

    STOP = "stop"
    LIMIT = "limit"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationResult:
    """One request's outcome.

    token_ids: every id generated after the prompt (int64), the final stop id included when one
    ended it. codes: the post-processed mixed audio codes (int64, 0..5119). seed: the seed its
    generator used. ending: what ended it (see ``Ending``).
    """

    token_ids: np.ndarray
    codes: np.ndarray
    seed: int
    ending: Ending

    @property
    def stopped(self) -> bool:
        """A stop id ended it (False: a length limit or a cancellation did)."""
        return self.ending is Ending.STOP

    @property
    def cancelled(self) -> bool:
        return self.ending is Ending.CANCELLED


@dataclass(frozen=True)
class SamplingSpec:
    """How one request turns logits into its next id; requests with equal specs are sampled together."""

    intensity: float = 1.0
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = DEFAULT_TOP_K
    do_sample: bool = True

    @property
    def guided(self) -> bool:
        return self.intensity != 1.0


def guidance_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (scale 1 gives ``cond``)."""
    return uncond + scale * (cond - uncond)


def repetition_rule(scores: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Ban each row's last id when it occurs at least twice in its window (in place, returned).

    scores : (B, V) float. window : (B, 10) int64, each row's last 10 ids, oldest first; a row
    holding fewer than 10 real ids is marked with -1 on its left and is left alone, as the
    reference leaves sequences shorter than its window.
    """
    last = window[:, -1]
    counts = (window == last[:, None]).sum(dim=1)
    ban = (counts >= REPETITION_MIN_COUNT) & (window >= 0).all(dim=1)
    current = scores.gather(1, last[:, None])  # written back unchanged where not banned: no host sync
    banned = torch.where(ban[:, None], torch.full_like(current, float("-inf")), current)
    return scores.scatter_(1, last[:, None], banned)


def repetition_windows(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(R, 10) last ids of each row for the repetition rule, -1 where a row is shorter."""
    out = torch.full((len(rows), REPETITION_WINDOW), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        tail = list(r[-REPETITION_WINDOW:])
        out[i, REPETITION_WINDOW - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
    return out.to(device)


def top_k_probs(
    scores: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = DEFAULT_TOP_K
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k, then softmax: (B, k) probabilities and their (B, k) token ids.

    Equal to transformers' ``TemperatureLogitsWarper`` + ``TopKLogitsWarper`` + softmax over the
    full vocabulary restricted to its non-zero entries (the warper would also keep exact float
    ties with the k-th score; ``topk`` keeps k). Without top-k: (B, V) probabilities and None.
    """
    scores = scores / temperature
    ids = None
    if top_k and top_k < scores.shape[-1]:
        scores, ids = torch.topk(scores, top_k, dim=-1)
    return torch.softmax(scores, dim=-1), ids


def sample_next(
    scores: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    do_sample: bool = True,
) -> torch.Tensor:
    """Next id per row (B,) from processed scores (B, V): temperature, top-k, softmax, multinomial.

    Row r draws from ``generators[r]`` alone, always as a (1, k) draw, so a request's draws do not
    depend on what else is in the batch. Drawing among the k candidates instead of over the
    whole vocabulary gives the same distribution at a fraction of the cost (multinomial draws one
    random number per candidate).
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    probs, ids = top_k_probs(scores, temperature=temperature, top_k=top_k)
    picks = torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g) for r, g in enumerate(generators)])
    return (picks if ids is None else ids.gather(1, picks)).view(-1)


def guided_scores(logits: torch.Tensor, first_rows: Sequence[int], spec: SamplingSpec) -> torch.Tensor:
    """The (n, V) scores after guidance of the requests whose conditional rows are ``first_rows``.

    A guided request's unconditional row is the one right after its conditional row.
    """
    device = logits.device
    cond = logits[torch.tensor(list(first_rows), device=device)]
    if not spec.guided:
        return cond
    uncond = logits[torch.tensor([r + 1 for r in first_rows], device=device)]
    return guidance_logits(cond, uncond, spec.intensity)


def sample_requests(
    logits: torch.Tensor,
    first_rows: Sequence[int],
    specs: Sequence[SamplingSpec],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """The next id of each request from the batch's (rows, vocab) logits.

    Request j's conditional row is ``first_rows[j]``, its unconditional row the one after it when
    guided. Its history is its conditional ids so far (prompt and generated; only the last 10 are
    read, for the repetition rule). Requests with equal specs are sampled as one group.
    """
    out = [0] * len(specs)
    groups: dict[SamplingSpec, list[int]] = {}
    for j, spec in enumerate(specs):
        groups.setdefault(spec, []).append(j)
    for spec, members in groups.items():
        scores = guided_scores(logits, [first_rows[j] for j in members], spec)
        window = repetition_windows([histories[j] for j in members], logits.device)
        scores = repetition_rule(scores, window)
        picks = sample_next(
            scores,
            [generators[j] for j in members],
            temperature=spec.temperature,
            top_k=spec.top_k,
            do_sample=spec.do_sample,
        )
        for j, token in zip(members, picks.tolist(), strict=True):
            out[j] = token
    return out


def postprocess(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Generated ids to mixed audio codes: cut at the first stop id, keep only audio ids, minus 65536."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    stops = np.flatnonzero(np.isin(ids, STOP_IDS))
    if stops.size:
        ids = ids[: stops[0]]
    keep = (ids >= AUDIO_ID_OFFSET) & (ids < AUDIO_ID_END)
    if not keep.all():
        logger.warning("dropped %d non-audio ids of %d generated", int((~keep).sum()), ids.size)
    return ids[keep] - AUDIO_ID_OFFSET


def resolve_seed(seed: int | None) -> int:
    """The seed a request draws with: the given one, or a fresh one (reported back) when None."""
    s = secrets.randbits(63) if seed is None else seed
    if not isinstance(s, int | np.integer) or isinstance(s, bool) or not 0 <= int(s) < 2**64:
        raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {s!r}", param="seed")
    return int(s)


def check_generation_args(
    prompt: PromptPair,
    spec: SamplingSpec,
    *,
    max_length: int,
    max_new_tokens: int | None,
    vocab_size: int | None,
) -> None:
    """Raise InvalidInputError before any compute, so a bad request costs no model time (and gets a 4xx)."""
    intensity, temperature, top_k = spec.intensity, spec.temperature, spec.top_k
    if not (isinstance(intensity, int | float) and MIN_INTENSITY <= intensity <= MAX_INTENSITY):
        raise InvalidInputError(
            f"intensity must be in [{MIN_INTENSITY}, {MAX_INTENSITY}], got {intensity!r}", param="intensity"
        )
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise InvalidInputError(f"temperature must be > 0, got {temperature!r}", param="temperature")
    if top_k is not None and top_k < 0:
        raise InvalidInputError(f"top_k must be >= 0, got {top_k!r}", param="top_k")
    if max_length < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise InvalidInputError("max_length and max_new_tokens must be >= 1", param="max_length")
    for ids in (prompt.cond, prompt.uncond):
        if not ids:
            raise InvalidInputError("a prompt is empty", param="input")
        if vocab_size is not None and not all(0 <= i < vocab_size for i in ids):
            raise InvalidInputError(f"a prompt holds ids outside [0, {vocab_size})", param="input")
    if len(prompt.cond) >= max_length:
        raise InvalidInputError(
            f"the prompt is {len(prompt.cond)} tokens, which leaves no room under max_length {max_length}",
            param="input",
        )
