"""Audio-token generation with Step1: the reference's sampling, batched, seedable, with guidance.

Per step and per prompt, in this order (the reference's order under transformers 4.53.3):

1. logits of the last position, in float32;
2. guidance when ``intensity != 1.0``: ``uncond + intensity * (cond - uncond)`` (see below);
3. the repetition-aware rule (docs/model.md §3.4): over the last 10 ids of the sequence, prompt
   included, if the last id occurs at least twice, it is banned (``-inf``); no-op while the
   sequence is shorter than 10. The window is the conditional sequence's;
4. temperature 0.7, then top-k 50, softmax, ``torch.multinomial`` among the k candidates with
   the prompt's own ``torch.Generator`` (the distribution of transformers' warpers, see
   ``top_k_probs``; the random stream differs, the reference being unseeded anyway).
   ``do_sample=False`` takes the argmax after step 3 instead (tests, benchmarks).

Stopping: ``<|EOT|>`` (3), the reference's EOS, and also ``</s>`` (2), which the reference would
sample on through (a hardening, docs/model.md §3.5); or when the prompt plus the
generated ids reach ``max_length`` (8192, the reference's total-length limit), or after
``max_new_tokens``. A prompt that stops leaves the batch (its rows are dropped from the KV cache),
the others go on.

Streaming: ``on_token`` sees every id the moment it is sampled, and ``stop_requested`` can end a
prompt between two steps; neither changes the ids. ``engine.scheduler`` builds continuous batching
(requests joining a running batch) from the same per-row steps.

Batching: prompts are left-padded into one batch with an ``attention_mask``; each prompt's
result equals generating it alone (argmax exactly; sampling too, since every prompt draws from
its own generator, up to float noise between batch shapes).

Guidance (``intensity``, 0.1..3.0): classifier-free guidance for language models. Each prompt's
conditional ids (the reference prompt) and unconditional ids (``PromptPair.uncond``: an edit
without its instruction, a clone without its speaker section) run as two rows of ONE batched
forward; both caches advance with the same sampled token. ``intensity`` 1.0 is exactly the
reference path: the unconditional rows are never built or run, and the output is bit-identical
to plain generation. Other values double the rows of every forward (about 2x the decode
compute and KV-cache memory per prompt).

Post-processing (``postprocess``) fixes the reference's bugs (docs/model.md §3.5): only a trailing
stop id is removed (a generation cut by the length limit keeps its last real token), and only
audio ids in [65536, 70656) are kept, as mixed codes 0..5119, instead of letting text ids turn
into code 0 or crash the vocoder's embedding.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from errors import InvalidInputError
from llm.prompts import PromptPair
from llm.text_tokenizer import AUDIO_ID_END, AUDIO_ID_OFFSET, EOS_ID, EOT_ID, PAD_ID

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
DEFAULT_MAX_LENGTH = 8192  # prompt + generated ids, as the reference's generate(max_length=8192)
STOP_IDS = (EOT_ID, EOS_ID)
REPETITION_WINDOW = 10
REPETITION_MIN_COUNT = 2  # the reference's count / 10 > 0.1 (float32), i.e. at least 2 of 10
MIN_INTENSITY = 0.1
MAX_INTENSITY = 3.0

StepHook = Callable[[int, list[int], torch.Tensor], None]
TokenHook = Callable[[int, int], None]  # (prompt index, id just sampled)
StopCheck = Callable[[int], bool]  # (prompt index) -> stop it now


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's outcome.

    token_ids: every id generated after the prompt (int64), the final stop id included when one
    ended it. codes: the post-processed mixed audio codes (int64, 0..5119). stopped: a stop id
    ended it (False: the length limit or a cancellation did). seed: the seed its generator used.
    cancelled: its caller stopped it early (the ids are those sampled until then).
    """

    token_ids: np.ndarray
    codes: np.ndarray
    stopped: bool
    seed: int
    cancelled: bool = False


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

    Row r draws from ``generators[r]`` alone, always as a (1, k) draw, so a prompt's draws do not
    depend on what else is in the batch. Drawing among the k candidates instead of over the
    whole vocabulary gives the same distribution at a fraction of the cost (multinomial draws one
    random number per candidate).
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    probs, ids = top_k_probs(scores, temperature=temperature, top_k=top_k)
    picks = torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g) for r, g in enumerate(generators)])
    return (picks if ids is None else ids.gather(1, picks)).view(-1)


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


def resolve_seeds(seed: int | Sequence[int | None] | None, n: int) -> list[int]:
    """One seed per prompt: an int applies to every prompt; None draws a fresh one (reported back)."""
    if seed is None or isinstance(seed, int | np.integer):
        seeds: list[int | None] = [None if seed is None else int(seed)] * n
    else:
        seeds = list(seed)
        if len(seeds) != n:
            raise InvalidInputError(f"got {len(seeds)} seeds for {n} prompts", param="seed")
    out = []
    for given in seeds:
        s = secrets.randbits(63) if given is None else given
        if not isinstance(s, int | np.integer) or not 0 <= int(s) < 2**64:
            raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {s!r}", param="seed")
        out.append(int(s))
    return out


def check_generation_args(
    prompts: Sequence[PromptPair],
    *,
    intensity: float,
    temperature: float,
    top_k: int | None,
    max_length: int,
    max_new_tokens: int | None,
    vocab_size: int | None,
) -> None:
    """Raise InvalidInputError before any compute, so a bad request costs no model time (and gets a 4xx)."""
    if not prompts:
        raise InvalidInputError("no prompts to generate from", param="input")
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
    for p in prompts:
        for ids in (p.cond, p.uncond):
            if not ids:
                raise InvalidInputError("a prompt is empty", param="input")
            if vocab_size is not None and not all(0 <= i < vocab_size for i in ids):
                raise InvalidInputError(f"a prompt holds ids outside [0, {vocab_size})", param="input")
        if len(p.cond) >= max_length:
            raise InvalidInputError(
                f"the prompt is {len(p.cond)} tokens, which leaves no room under max_length {max_length}",
                param="input",
            )


def left_pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) input ids padded on the left with the pad id, and the (R, L) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def repetition_windows(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(R, 10) last ids of each row for the repetition rule, -1 where a row is shorter."""
    out = torch.full((len(rows), REPETITION_WINDOW), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        tail = list(r[-REPETITION_WINDOW:])
        out[i, REPETITION_WINDOW - len(tail) :] = torch.as_tensor(tail, dtype=torch.long)
    return out.to(device)


class LastLogits:
    """Calls the model's forward for the last position's float32 logits, with an explicit cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.last_only = "logits_to_keep" in params  # skip the head on every prompt position

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, cache: object) -> torch.Tensor:
        """``cache``: a transformers ``DynamicCache`` or any object with its update interface
        (``llm.batching.RowKVCache``)."""
        kwargs: dict[str, object] = {"logits_to_keep": 1} if self.last_only else {}
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless wrapper: fall back to CPU
        return torch.device("cpu")


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[PromptPair],
    *,
    intensity: float = 1.0,
    seed: int | Sequence[int | None] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = DEFAULT_TOP_K,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int | None = None,
    do_sample: bool = True,
    on_step: StepHook | None = None,
    on_token: TokenHook | None = None,
    stop_requested: StopCheck | None = None,
) -> list[GenerationResult]:
    """Generate audio ids for every prompt in one batch; see the module docstring for the rules.

    model: a causal LM whose ``forward(input_ids, attention_mask, past_key_values, use_cache)``
    honours left padding and fills the given ``DynamicCache`` (``llm.model.Step1ForCausalLM``).
    seed: one int for all prompts, one per prompt, or None (fresh seeds, reported in the results).
    on_step(step, prompt_indices, scores): called each step with the (n, V) float32 scores after
    guidance and before the repetition rule, for the prompts still running; for tests and probes.
    on_token(prompt_index, id): streaming; called with every id as soon as it is sampled (the
    final stop id included), in order, on this thread, so a consumer can work while the next step
    runs. stop_requested(prompt_index): asked between steps for every running prompt; True ends
    that prompt there (its result has ``cancelled`` set), the others go on. Neither changes the ids.
    """
    config = getattr(model, "config", None)
    check_generation_args(
        prompts,
        intensity=intensity,
        temperature=temperature,
        top_k=top_k,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        vocab_size=getattr(config, "vocab_size", None),
    )
    device = model_device(model)
    seeds = resolve_seeds(seed, len(prompts))
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    guided = intensity != 1.0
    budgets = [max_length - len(p.cond) for p in prompts]
    if max_new_tokens is not None:
        budgets = [min(b, max_new_tokens) for b in budgets]

    rows = [p.cond for p in prompts] + ([p.uncond for p in prompts] if guided else [])
    ids, mask = left_pad(rows, device)
    window = repetition_windows([p.cond for p in prompts], device)
    forward = LastLogits(model)
    cache = DynamicCache()
    start = time.perf_counter()
    logits = forward(ids, mask, cache)  # (R, V)
    prefill_s = time.perf_counter() - start

    active = list(range(len(prompts)))  # prompt index of each running conditional row
    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    cancelled = [False] * len(prompts)
    step = 0
    while True:
        n = len(active)
        scores = guidance_logits(logits[:n], logits[n:], intensity) if guided else logits
        if on_step is not None:
            on_step(step, list(active), scores)
        scores = repetition_rule(scores.clone() if on_step is not None else scores, window)
        next_ids = sample_next(
            scores, [generators[i] for i in active], temperature=temperature, top_k=top_k, do_sample=do_sample
        )
        keep = []
        for r, token in enumerate(next_ids.tolist()):
            i = active[r]
            generated[i].append(token)
            if on_token is not None:
                on_token(i, token)
            stopped[i] = token in STOP_IDS
            if stopped[i] or len(generated[i]) >= budgets[i]:
                continue
            if stop_requested is not None and stop_requested(i):
                cancelled[i] = True
                continue
            keep.append(r)
        if not keep:
            break
        window = torch.cat([window[:, 1:], next_ids[:, None]], dim=1)
        if len(keep) < n:  # drop finished prompts (both of their rows) from the batch and cache
            sel = keep + [n + r for r in keep] if guided else keep
            index = torch.tensor(sel, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask = mask[index]
            window = window[torch.tensor(keep, device=device)]
            next_ids = next_ids[torch.tensor(keep, device=device)]
            active = [active[r] for r in keep]
        feed = torch.cat([next_ids, next_ids]) if guided else next_ids
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = forward(feed[:, None], mask, cache)
        step += 1

    elapsed = time.perf_counter() - start
    total = sum(len(g) for g in generated)
    logger.info(
        "generated %d ids for %d prompt(s) in %.2fs (prefill %.2fs, %.1f ids/s, %d steps, intensity %g)",
        total,
        len(prompts),
        elapsed,
        prefill_s,
        total / max(elapsed - prefill_s, 1e-9),
        step + 1,
        intensity,
    )
    return [
        GenerationResult(token_ids=np.asarray(g, dtype=np.int64), codes=postprocess(g), stopped=s, seed=sd, cancelled=c)
        for g, s, sd, c in zip(generated, stopped, seeds, cancelled, strict=True)
    ]


def generate_audio_ids(model: nn.Module, prompts: Sequence[PromptPair], **options: Any) -> list[np.ndarray]:
    """Mixed audio codes (0..5119, int64) per prompt: ``generate`` (same keyword options) without the details."""
    return [r.codes for r in generate(model, prompts, **options)]
