"""Step1 model on the tiny generated bundle: checkpoint layout, ALiBi, KV cache, left padding."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import llm  # noqa: F401 - registers Step1 with the Auto classes
from bundles.llm_bundle import (
    AUDIO_TOKEN_OFFSET,
    CONFIG_NAME,
    INDEX_NAME,
    N_AUDIO_TOKENS,
    WEIGHTS_NAME,
    llm_config_dict,
    llm_weight_shapes,
    write_llm_bundle,
)
from errors import InvalidInputError
from llm.config import Step1Config
from llm.model import Step1ForCausalLM, alibi_slopes, project, sqrt_alibi_bias
from tests.conftest import REPO_ROOT

FULL_KEYS_TSV = REPO_ROOT / "tests" / "data" / "checkpoint-keys" / "step1_full_keys.tsv"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llm_bundle(tmp_path_factory.mktemp("llm"), size="tiny", seed=3)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Step1ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _ids(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    """Prompt-like ids: text-range ids then audio ids."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(5, 1000, (batch, n // 2), generator=gen)
    audio = torch.randint(AUDIO_TOKEN_OFFSET, AUDIO_TOKEN_OFFSET + N_AUDIO_TOKENS, (batch, n - n // 2), generator=gen)
    return torch.cat([text, audio], dim=1)


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", key)


def _naive_logits(model: Step1ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Textbook Step1 written straight from docs/model.md §3.1, for one unpadded batch without cache:
    K/V repeated per head, a full (H, T, T) bias, explicit softmax."""
    cfg = model.config
    H, G, D = cfg.num_attention_heads, cfg.num_attention_groups, cfg.head_dim
    n = 2 ** math.floor(math.log2(H))
    slopes = [(2 ** (-8 / n)) ** k for k in range(1, n + 1)] + [(2 ** (-4 / n)) ** k for k in range(1, 2 * (H - n), 2)]
    T = ids.shape[1]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    dist = (i - j).clamp(min=0).float().sqrt()
    bias = -torch.tensor(slopes)[:, None, None] * dist
    bias = bias.masked_fill(j > i, float("-inf"))

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    sd = {k: v.float() for k, v in model.state_dict().items()}
    x = sd["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(1, T, H, D).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(1, T, G, D).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(1, T, G, D).transpose(1, 2)
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(1, T, H * D)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = F.silu(h @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


# --- checkpoint layout ---------------------------------------------------------------------------


def test_tiny_bundle_files_follow_the_official_layout(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / CONFIG_NAME).read_text())
    assert config["model_type"] == "step1" and config["architectures"] == ["Step1ForCausalLM"]
    assert config["vocab_size"] == 74752 and "tie_word_embeddings" not in config and "auto_map" not in config
    assert config["num_attention_heads"] & (config["num_attention_heads"] - 1), "heads must not be a power of 2"
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    with safe_open(str(tiny_dir / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert set(index["weight_map"]) == keys and set(index["weight_map"].values()) == {WEIGHTS_NAME}
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s in shapes.values())
    assert shapes == llm_weight_shapes(config)


def test_key_names_and_full_size_shapes_match_the_official_checkpoint(tiny_dir: Path) -> None:
    """Tiny key pattern == the official pattern; a meta-device full-size model == the official shapes."""
    with torch.device("meta"):
        full = Step1ForCausalLM(Step1Config(**llm_config_dict("full")))
    full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert full_shapes == llm_weight_shapes(llm_config_dict("full"))
    assert sum(math.prod(s) for s in full_shapes.values()) == 3_529_706_496  # docs/model.md §1.3
    with safe_open(str(tiny_dir / WEIGHTS_NAME), "pt") as f:
        tiny_patterns = {_pattern(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    rows = [line.split("\t") for line in FULL_KEYS_TSV.read_text().splitlines()[1:] if line.strip()]
    official = {key: tuple(json.loads(shape)) for key, shape, _dtype in rows}
    assert list(full_shapes) == list(official)  # same keys, same order
    assert full_shapes == official
    assert tiny_patterns == {_pattern(k) for k in official}


def test_lm_head_is_never_tied(tiny_dir: Path, model: Step1ForCausalLM) -> None:
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    forced = AutoConfig.from_pretrained(tiny_dir, tie_word_embeddings=True)
    assert isinstance(forced, Step1Config) and forced.tie_word_embeddings is False


def test_config_rejects_shapes_attention_cannot_split() -> None:
    with pytest.raises(ValueError, match="num_attention_groups"):
        Step1Config(num_attention_heads=48, num_attention_groups=5)
    with pytest.raises(ValueError, match="hidden_size"):
        Step1Config(hidden_size=100, num_attention_heads=48)


# --- ALiBi ---------------------------------------------------------------------------------------


def test_alibi_slopes_for_48_heads_follow_the_reference_rule() -> None:
    # docs/model.md §3.1: 32 slopes (2^(-8/32))^k, k = 1..32, then 16 slopes (2^(-4/32))^k, k = 1, 3, ..., 31
    expected = [(2 ** (-8 / 32)) ** k for k in range(1, 33)] + [(2 ** (-4 / 32)) ** k for k in range(1, 32, 2)]
    assert alibi_slopes(48) == pytest.approx(expected, rel=1e-12)
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rel=1e-12)
    assert alibi_slopes(32) == pytest.approx(expected[:32], rel=1e-12)


def test_bias_is_built_for_the_computed_rows_only() -> None:
    slopes = torch.tensor(alibi_slopes(6))
    keys = torch.arange(10)
    step = sqrt_alibi_bias(slopes, keys[-1:], keys, None, torch.float32)
    assert step.shape == (1, 6, 1, 10)  # one decode row, not (10, 10)
    assert torch.allclose(step[0, :, 0], -slopes[:, None] * (9 - keys).float().sqrt())
    padding = torch.tensor([[True, True] + [False] * 8])
    padded = sqrt_alibi_bias(slopes, keys, keys, padding, torch.float32)
    assert padded.shape == (1, 6, 10, 10)
    assert torch.isinf(padded[0, :, 5, :2]).all() and torch.isfinite(padded[0, :, 5, 2:6]).all()
    assert torch.isinf(padded[0, :, 5, 6:]).all()  # causal
    assert torch.isfinite(padded[0, :, 0, 0]).all()  # a padding query sees itself: finite softmax


def test_one_bias_per_forward_is_shared_by_every_layer(model: Step1ForCausalLM) -> None:
    seen: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda _m, args: seen.append(args[1])) for layer in model.model.layers
    ]
    try:
        cache = DynamicCache()
        with torch.inference_mode():
            model(_ids(0, 40), cache=cache, use_cache=True)
            seen.clear()
            model(_ids(1, 1), cache=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == model.config.num_hidden_layers
    assert all(b is seen[0] for b in seen)
    assert seen[0].shape == (1, model.config.num_attention_heads, 1, 41)


# --- forward ---------------------------------------------------------------------------------------


def test_forward_equals_a_textbook_implementation(model: Step1ForCausalLM) -> None:
    ids = _ids(5, 57)
    with torch.inference_mode():
        ours = model(ids, use_cache=False).logits
    assert torch.allclose(ours, _naive_logits(model, ids), atol=1e-5, rtol=0)


def test_logits_with_kv_cache_equal_logits_without(model: Step1ForCausalLM) -> None:
    ids = _ids(7, 70)
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache()
        prefill = model(ids[:, :60], cache=cache, use_cache=True).logits
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(60, 70)]
        # the older keyword works too
        legacy = model(ids[:, :60], past_key_values=DynamicCache(), use_cache=True).cache
    cached = torch.cat([prefill, *steps], dim=1)
    assert cache.get_seq_length() == 70 and legacy.get_seq_length() == 60
    assert (cached - full).abs().max().item() < 1e-5


def test_left_padded_batch_equals_one_at_a_time(model: Step1ForCausalLM) -> None:
    """Prefill + greedy decode of a left-padded batch gives each row's unbatched logits and tokens."""
    prompts = [_ids(11, 30)[0], _ids(12, 45)[0], _ids(13, 38)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1

    def greedy(ids: torch.Tensor, attention: torch.Tensor | None, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = DynamicCache()
        logits = model(ids, attention_mask=attention, cache=cache, use_cache=True).logits[:, -1]
        all_logits, tokens = [logits], []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            if attention is not None:
                attention = torch.cat([attention, torch.ones_like(token)], dim=1)
            logits = model(token, attention_mask=attention, cache=cache, use_cache=True).logits[:, -1]
            all_logits.append(logits)
        return torch.stack(all_logits, 1), torch.cat(tokens, 1)

    with torch.inference_mode():
        batched_logits, batched_tokens = greedy(batch, mask, 12)
        for row, p in enumerate(prompts):
            single_logits, single_tokens = greedy(p[None], None, 12)
            assert torch.equal(batched_tokens[row], single_tokens[0])
            assert (batched_logits[row] - single_logits[0]).abs().max().item() < 1e-5
        # transformers' generate() drives the same forward with its own cache and mask handling
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(generated[:, width:], batched_tokens)


def test_random_tiny_weights_emit_only_audio_ids_or_eos(model: Step1ForCausalLM) -> None:
    with torch.inference_mode():
        logits = model(_ids(21, 50, batch=2)).logits
    top = logits.topk(50, dim=-1).indices
    is_audio = (top >= AUDIO_TOKEN_OFFSET) & (top < AUDIO_TOKEN_OFFSET + N_AUDIO_TOKENS)
    assert (is_audio | (top == model.config.eos_token_id)).all()


def test_bfloat16_forward_runs_and_tracks_fp32(tiny_dir: Path, model: Step1ForCausalLM) -> None:
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    ids = _ids(17, 40)
    with torch.inference_mode():
        low = bf16(ids).logits
        high = model(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - high).abs().max().item() < 0.1 * high.abs().max().item()


def test_logits_to_keep_computes_only_the_last_rows(model: Step1ForCausalLM) -> None:
    ids = _ids(19, 20)
    with torch.inference_mode():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, 74752) and torch.allclose(last[0, 0], full[0, -1], atol=1e-5)


def test_bad_inputs_raise_typed_errors(model: Step1ForCausalLM) -> None:
    with pytest.raises(InvalidInputError, match="attention_mask"):
        model(_ids(1, 10), attention_mask=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="input_ids"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidInputError, match="exactly one"):
        model()


def test_long_inputs_run_in_row_chunks_with_the_same_result(
    model: Step1ForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _ids(23, 60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.inference_mode():
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        whole_cache = DynamicCache()
        model(ids[:, :40], attention_mask=mask[:, :40], cache=whole_cache)
        seen: list[tuple[int, ...]] = []
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda _m, a: seen.append(a[1].shape))
        per_row = 2 * model.config.num_attention_heads * 60 * 4  # batch 2 (padded), 60 keys, fp32
        monkeypatch.setattr(model.model, "bias_budget_bytes", 7 * per_row)
        try:
            chunked = model(ids, attention_mask=mask, use_cache=False)
            chunk_cache = DynamicCache()
            model(ids[:, :40], attention_mask=mask[:, :40], cache=chunk_cache)
        finally:
            hook.remove()
    assert chunked.cache is None
    assert seen[:2] == [(2, 6, 7, 7), (2, 6, 7, 14)]
    assert len(seen) == 9 + 4  # 60 rows by 7, then 40 rows by 10 (fewer keys: more rows fit)
    assert (chunked.logits - whole).abs().max().item() < 1e-5
    for layer in range(model.config.num_hidden_layers):
        assert torch.allclose(chunk_cache.layers[layer].keys, whole_cache.layers[layer].keys, atol=1e-5)


def test_small_cpu_batches_project_row_by_row_with_the_same_values() -> None:
    linear = torch.nn.Linear(32, 48, bias=True)
    x = torch.randn(2, 1, 32)
    assert torch.allclose(project(linear, x), linear(x), atol=1e-6)
    calls: list[int] = []
    linear.register_forward_hook(lambda _m, _i, _o: calls.append(1))  # e.g. a quantiser's hook
    project(linear, x)
    assert calls == [1]  # a hooked layer still runs through its own forward
