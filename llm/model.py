"""Step1: the Step-Audio-EditX language model, written in the project (no remote code).

A pre-norm decoder-only transformer: RMSNorm, grouped-query attention without bias and without
rotary embeddings, SwiGLU MLP, and an untied ``lm_head``. Position enters only through a
square-root ALiBi bias, ``bias[h, i, j] = -slope_h * sqrt(i - j)`` for ``j <= i``.

Differences from the reference remote code (same function, docs/model.md §3.1):
- ``attention_mask`` is honoured, so left-padded batches work (the reference ignores it);
- the bias is built once per forward for the query rows actually computed (``q x k``), shared by
  every layer, instead of a full ``(heads, T, T)`` tensor per layer per step;
- grouped K/V are never copied per head: the query heads of one group are folded into the
  query-row dimension of a single SDPA call against that group's K/V.

Attribute names are the official checkpoint keys (``model.layers.N.self_attn.q_proj.weight``...).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from errors import InvalidInputError
from llm.config import Step1Config


@functools.lru_cache(maxsize=16)
def alibi_slopes(n_heads: int) -> tuple[float, ...]:
    """The reference's ALiBi slopes for ``n_heads`` heads.

    ``n = 2**floor(log2 H)``; the first n slopes are ``2**(-8k/n)`` for k = 1..n, and the
    remaining ``H - n`` are the odd steps of the doubled series, ``2**(-4(2m-1)/n)`` for
    m = 1..H-n (for 48 heads: 32 + 16 slopes).
    """
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    n = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * (2 * m - 1) / n) for m in range(1, n_heads - n + 1)]
    return tuple(slopes)


def sqrt_alibi_bias(
    slopes: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_padding: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive attention bias for the computed query rows only.

    slopes : (H,) float32.  query_positions : (q,) int64.  key_positions : (k,) int64.
    key_padding : (B, k) bool, True where the key is padding; None when nothing is padded.
    Returns (B or 1, H, q, k) in ``dtype``: ``-slope_h * sqrt(i - j)`` where key j is visible to
    query i, ``-inf`` elsewhere. With left padding the real tokens keep their distances (a shift
    of both positions), so only the masking changes; a padding query sees just itself, which keeps
    its softmax finite (its output is never used).
    """
    distance = query_positions[:, None] - key_positions[None, :]  # (q, k)
    visible = distance >= 0
    bias = -slopes[:, None, None] * distance.clamp(min=0).to(torch.float32).sqrt()  # (H, q, k)
    if key_padding is None:
        return bias.masked_fill(~visible, float("-inf")).to(dtype).unsqueeze(0)
    visible = (visible & ~key_padding[:, None, :]) | (distance == 0)  # (B, q, k)
    return bias.unsqueeze(0).masked_fill(~visible[:, None], float("-inf")).to(dtype)


# CPU BLAS (MKL here) multiplies 2-4 rows by a large weight 3-5x slower than it does one row,
# while one-row products run at memory speed: a CFG pair or a small batch decodes faster row by row.
ROW_BY_ROW_MAX_ROWS = 4


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for x : (..., in) -> (..., out); on CPU, 2-4 rows go through one-row products.

    Only a plain ``nn.Linear`` (no hooks, no replaced forward, so never a quantised layer) takes
    the row path; it computes the same products (equal to rounding).
    """
    rows = x.numel() // x.shape[-1]
    if (
        1 < rows <= ROW_BY_ROW_MAX_ROWS
        and x.device.type == "cpu"
        and type(linear) is nn.Linear
        and "forward" not in linear.__dict__
        and not (linear._forward_hooks or linear._forward_pre_hooks)
    ):
        flat = x.reshape(rows, x.shape[-1])
        out = torch.stack([F.linear(row, linear.weight, linear.bias) for row in flat])
        return out.view(*x.shape[:-1], out.shape[-1])
    y: torch.Tensor = linear(x)
    return y


class Step1RMSNorm(nn.Module):
    """RMSNorm with the variance computed in float32, as the reference."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (..., hidden) any float dtype -> same shape and dtype."""
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x.to(torch.float32) * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class Step1MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x : (B, T, hidden) -> (B, T, hidden)."""
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))


class Step1Attention(nn.Module):
    """Grouped-query attention (head h reads K/V group ``h // (heads / groups)``), no bias, no RoPE."""

    def __init__(self, config: Step1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_groups = config.num_attention_groups
        self.head_dim = config.head_dim
        kv_width = self.n_groups * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """x : (B, q, hidden); bias : (B or 1, H, q, k) with k = cached + q -> (B, q, hidden)."""
        B, q_len, _ = x.shape
        H, G, D = self.n_heads, self.n_groups, self.head_dim
        per_group = H // G
        query = project(self.q_proj, x).view(B, q_len, H, D).transpose(1, 2)  # (B, H, q, D)
        key = project(self.k_proj, x).view(B, q_len, G, D).transpose(1, 2)  # (B, G, q, D)
        value = project(self.v_proj, x).view(B, q_len, G, D).transpose(1, 2)  # (B, G, q, D)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, G, k, D)
        k_len = key.shape[2]
        # Fold the heads of each group into query rows: (B, G, per_group * q, D) against (B, G, k, D).
        query = query.reshape(B, G, per_group * q_len, D)
        mask = bias.reshape(bias.shape[0], G, per_group * q_len, k_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # scale 1/sqrt(D)
        out = out.view(B, H, q_len, D).transpose(1, 2).reshape(B, q_len, H * D)
        return project(self.o_proj, out)


class Step1DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: Step1Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Step1Attention(config, layer_idx)
        self.mlp = Step1MLP(config)
        self.input_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """x : (B, q, hidden) -> (B, q, hidden)."""
        x = x + self.self_attn(self.input_layernorm(x), bias, cache)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Step1PreTrainedModel(PreTrainedModel):
    """transformers plumbing shared by the Step1 classes (config class, weight init, SDPA)."""

    config_class = Step1Config
    config: Step1Config
    base_model_prefix = "model"
    _no_split_modules = ["Step1DecoderLayer"]  # noqa: RUF012 - transformers class attribute
    _supports_sdpa = True
    main_input_name = "input_ids"


class Step1Model(Step1PreTrainedModel):
    """Embeddings, decoder layers and final norm (checkpoint prefix ``model.``)."""

    # Largest attention bias built at once; a longer prefill runs in chunks of query rows
    # (a padded batch of 8 x 48 heads x 2048^2 keys would otherwise take 6 GB in fp32).
    bias_budget_bytes: int = 256 * 2**20

    def __init__(self, config: Step1Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Step1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._slopes: dict[torch.device, torch.Tensor] = {}  # per-device copy, not a checkpoint key
        self.post_init()

    def slopes(self, device: torch.device) -> torch.Tensor:
        """The (H,) float32 ALiBi slopes on ``device`` (made once per device)."""
        if device not in self._slopes:
            values = alibi_slopes(self.config.num_attention_heads)
            self._slopes[device] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._slopes[device]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast:
        """input_ids : (B, q) int64, or inputs_embeds : (B, q, hidden).

        attention_mask : (B, cached + q), 1 for real tokens and 0 for padding (left padding);
        None means nothing is padded. cache : a transformers Cache holding the earlier keys and
        values; a given cache is read and extended, and one is created when ``use_cache`` and
        none is given. Returns last_hidden_state (B, q, hidden) and the cache (or None).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidInputError("pass exactly one of input_ids or inputs_embeds", param="input_ids")
        if inputs_embeds is None:
            assert input_ids is not None  # exactly one of the two, checked above
            if input_ids.ndim != 2:
                raise InvalidInputError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        B, q_len, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        device = inputs_embeds.device
        key_padding = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (B, past + q_len):
                raise InvalidInputError(
                    f"attention_mask must be (batch, cached + new) = ({B}, {past + q_len}), "
                    f"got {tuple(attention_mask.shape)}",
                    param="attention_mask",
                )
            padding = attention_mask.to(device) == 0
            if bool(padding.any()):
                key_padding = padding
        # Long inputs run in chunks of query rows through a cache, so one bias stays in budget.
        bias_rows = B if key_padding is not None else 1
        per_row = bias_rows * self.config.num_attention_heads * (past + q_len) * inputs_embeds.element_size()
        chunk = max(1, min(q_len, self.bias_budget_bytes // per_row))
        work_cache = cache if cache is not None else (DynamicCache() if chunk < q_len else None)
        positions = torch.arange(past + q_len, device=device)
        slopes = self.slopes(device)
        outputs = []
        for start in range(0, q_len, chunk):
            end = min(start + chunk, q_len)
            bias = sqrt_alibi_bias(
                slopes,
                positions[past + start : past + end],
                positions[: past + end],
                key_padding[:, : past + end] if key_padding is not None else None,
                inputs_embeds.dtype,
            )  # (B or 1, H, rows, cached + rows), shared by every layer
            x = inputs_embeds[:, start:end]
            for layer in self.layers:
                x = layer(x, bias, work_cache)
            outputs.append(x)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class Step1ForCausalLM(Step1PreTrainedModel, GenerationMixin):
    """Step1 with its untied ``lm_head``; the class the checkpoint's ``architectures`` names."""

    def __init__(self, config: Step1Config) -> None:
        super().__init__(config)
        self.model = Step1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        """input_ids : (B, q) -> logits (B, q or logits_to_keep, vocab) in the model dtype.

        ``cache`` (transformers >= 5 name) and ``past_key_values`` (older name) are the same
        object; pass either. ``logits_to_keep`` > 0 computes the head only for the last rows (a
        prefill needs just the last one). ``position_ids`` and other generate() extras are
        ignored: Step1 has no position embeddings and its ALiBi distances come from the cache.
        """
        if cache is None:
            cache = past_key_values
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=project(self.lm_head, hidden), cache=out.cache)
