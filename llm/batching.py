"""Model-level pieces of continuous batching: a KV cache whose rows come and go, prefill, the forward call.

A running batch is a set of requests, each owning one row (``intensity == 1``) or two rows (cond,
uncond) of one KV cache. Step1 has no position embeddings and its sqrt-ALiBi bias depends only on
the distance between query and key, so a row can sit anywhere in the cache as long as its real
tokens are contiguous and every other column is masked: rows are stored right-aligned on one shared
end column, each with its own length, and padding on the left is masked out. Every running row
gains exactly one token per decode step, so the shared end column stays shared.

Memory follows the rows that are live, not the history of the batch: when a request leaves, its
rows are dropped and the columns no remaining row needs are cut (``leave``); when one joins, only
the width it needs is added (``join``). What remains is the left padding of the shorter rows: a
decode step stores ``rows x width`` keys where ``width`` is the longest live row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llm.prompts import PromptPair
from llm.text_tokenizer import PAD_ID

GROWTH_BLOCK = 64  # columns added at a time when the cache runs out of room (amortises the copy)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless wrapper: fall back to CPU
        return torch.device("cpu")


def left_pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) input ids padded on the left with the pad id, and the (R, L) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


class LastLogits:
    """Calls the model's forward for the last position's float32 logits, with an explicit cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.last_only = "logits_to_keep" in params  # skip the head on every prompt position

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, cache: RowKVCache) -> torch.Tensor:
        """ids, mask : (rows, q) -> (rows, vocab) float32 logits of each row's last position."""
        kwargs: dict[str, object] = {"logits_to_keep": 1} if self.last_only else {}
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits


def num_layers(model: nn.Module) -> int:
    """Decoder layers of a Step1 model (the KV cache holds one key/value pair per layer)."""
    config: Any = model.config
    return int(config.num_hidden_layers)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one row's keys and values take per cached token, summed over layers."""
    config: Any = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    dtype = getattr(model, "dtype", torch.float32)  # activations (hence K/V) are in the model dtype, even quantised
    return int(2 * config.num_hidden_layers * config.num_attention_groups * head_dim * dtype.itemsize)


class RowKVCache:
    """Keys and values of a batch of rows, right-aligned, with per-row real lengths.

    Implements the two methods ``llm.model`` calls on a cache: ``get_seq_length`` (the live width)
    and ``update`` (append this forward's keys and values, return the live ones). The width
    advances when the last layer has written, so a forward the model splits into chunks works too.
    Storage per layer is ``(rows, groups, capacity, head_dim)`` with ``capacity - width`` spare
    columns. Masked columns hold zeros or finite stale values, never uninitialised memory: a masked key
    still multiplies its value by 0, and 0 * NaN is NaN.
    """

    def __init__(self, n_layers: int, n_rows: int) -> None:
        self.n_layers = n_layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * n_rows
        self.width = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        """Bytes held now, spare columns included."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value : (rows, groups, q, head_dim) -> every live key and value, (rows, groups, width + q, head_dim)."""
        q = key.shape[2]
        end = self.width + q
        if layer_idx == len(self.keys):  # first forward through this layer
            shape = (key.shape[0], key.shape[1], end + GROWTH_BLOCK, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        elif end > self.keys[layer_idx].shape[2]:
            self.keys[layer_idx] = self._resized(self.keys[layer_idx], end + GROWTH_BLOCK)
            self.values[layer_idx] = self._resized(self.values[layer_idx], end + GROWTH_BLOCK)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.width : end] = key
        values[:, :, self.width : end] = value
        if layer_idx == self.n_layers - 1:
            self.width = end
            self.lengths = [n + q for n in self.lengths]
        return keys[:, :, :end], values[:, :, :end]

    def _resized(self, storage: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = storage.new_zeros((*storage.shape[:2], capacity, storage.shape[3]))
        grown[:, :, : self.width] = storage[:, :, : self.width]
        return grown

    def mask(self, new: int = 1) -> torch.Tensor:
        """(rows, width + new) attention mask of the next forward, 1 on each row's real and new tokens."""
        device = self.keys[0].device if self.keys else torch.device("cpu")
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        columns = torch.arange(self.width + new, device=device)
        return (columns[None, :] >= (self.width - lengths)[:, None]).long()

    def join(self, other: RowKVCache) -> None:
        """Append ``other``'s rows (a fresh prefill); the narrower side gets left padding."""
        if not self.lengths:
            self.keys, self.values = other.keys, other.values
            self.lengths, self.width = list(other.lengths), other.width
            return
        width = max(self.width, other.width)
        for store in ("keys", "values"):
            mine, theirs = getattr(self, store), getattr(other, store)
            merged = []
            for a, b in zip(mine, theirs, strict=True):
                out = a.new_zeros((a.shape[0] + b.shape[0], a.shape[1], width + GROWTH_BLOCK, a.shape[3]))
                out[: a.shape[0], :, width - self.width : width] = a[:, :, : self.width]
                out[a.shape[0] :, :, width - other.width : width] = b[:, :, : other.width]
                merged.append(out)
            setattr(self, store, merged)
        self.lengths = self.lengths + other.lengths
        self.width = width

    def leave(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (in that order) and cut the columns none of them uses."""
        lengths = [self.lengths[i] for i in keep]
        if not lengths:
            self.keys, self.values, self.lengths, self.width = [], [], [], 0
            return
        width = max(lengths)
        index = torch.tensor(list(keep), dtype=torch.long, device=self.keys[0].device)
        for store in ("keys", "values"):
            kept = []
            for a in getattr(self, store):
                out = a.new_zeros((len(lengths), a.shape[1], width + GROWTH_BLOCK, a.shape[3]))
                out[:, :, :width] = a[:, :, self.width - width : self.width].index_select(0, index)
                kept.append(out)
            setattr(self, store, kept)
        self.lengths, self.width = lengths, width


def request_rows(prompt: PromptPair, guided: bool) -> list[list[int]]:
    """The cache rows of one request: its conditional ids, then its unconditional ids when guided."""
    return [list(prompt.cond), list(prompt.uncond)] if guided else [list(prompt.cond)]


@torch.inference_mode()
def prefill(model: nn.Module, forward: LastLogits, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, RowKVCache]:
    """Run one request's rows alone (a guided request's two rows left-padded to one width).

    Returns the (rows, vocab) float32 logits of the next token and a cache ready to ``join``.
    Prefilling each request on its own keeps its numbers those of a solo run.
    """
    ids, mask = left_pad(rows, model_device(model))
    cache = RowKVCache(num_layers(model), len(rows))
    logits = forward(ids, mask, cache)
    cache.lengths = [len(r) for r in rows]
    return logits, cache


def peak_kv_bytes(requests: Sequence[tuple[int, int, int]], bytes_per_token: int) -> int:
    """Worst-case bytes a ``RowKVCache`` reaches if each request runs to its limit.

    requests: (rows, current longest row length, decode steps left) per request. While the same
    set runs, width grows by one per step, so the peak of each phase is just before a request
    leaves: checking those instants (and now) covers the whole future.
    """
    if not requests:
        return 0
    peak = 0
    for _, _, horizon in [(0, 0, 0), *requests]:
        alive = [(rows, length) for rows, length, left in requests if left >= horizon]
        if not alive:
            continue
        width = max(length for _, length in alive) + horizon
        peak = max(peak, sum(rows for rows, _ in alive) * (width + GROWTH_BLOCK))
    return peak * bytes_per_token
