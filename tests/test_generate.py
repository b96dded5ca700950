"""Generation on a tiny Step1 through the one decode loop: the repetition rule, stopping, post-processing,
seeds, batching, guidance, cancelling."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from bundles.text_tokenizer_bundle import write_text_tokenizer
from errors import InvalidInputError
from llm.batching import LastLogits, prefill
from llm.config import Step1Config
from llm.decode import DecodeLoop, generate
from llm.model import Step1ForCausalLM
from llm.prompts import PromptPair, build_clone_prompt
from llm.sampling import (
    GenerationResult,
    SamplingSpec,
    guidance_logits,
    guided_scores,
    postprocess,
    repetition_rule,
    top_k_probs,
)
from llm.text_tokenizer import AUDIO_ID_OFFSET, load_text_tokenizer
from tests.conftest import example_prompt_pairs, load_reference

X, Y = AUDIO_ID_OFFSET + 4464, AUDIO_ID_OFFSET + 464  # the biased model's favourite and runner-up


def _tiny_model(seed: int = 0) -> Step1ForCausalLM:
    """2 layers, 6 heads over 2 groups, official vocabulary; weights scaled so logits are decisive."""
    torch.manual_seed(seed)
    config = Step1Config(
        hidden_size=48,
        intermediate_size=128,
        num_attention_heads=6,
        num_attention_groups=2,
        num_hidden_layers=2,
        vocab_size=74752,
    )
    model = Step1ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                gain = 1.0 if "embed" in name else (3.0 if "lm_head" in name else 1.0) / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * gain)
    return model


def _biased(model: Step1ForCausalLM, favourites: dict[int, float]) -> Step1ForCausalLM:
    """A copy whose hidden state has a large constant component read only by ``favourites``."""
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.model.embed_tokens.weight[:, 0] += 30.0
        biased.lm_head.weight[:, 0] = 0.0
        for token, weight in favourites.items():
            biased.lm_head.weight[token] = 0.0
            biased.lm_head.weight[token, 0] = weight
    return biased


@pytest.fixture(scope="module")
def model() -> Step1ForCausalLM:
    return _tiny_model()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[PromptPair]:
    """Real prompts from the project tokenizer: a clone and two edits of different lengths."""
    d = tmp_path_factory.mktemp("editx")
    write_text_tokenizer(d)
    tok = load_text_tokenizer(d)
    return example_prompt_pairs(tok, long_groups=9)


def _forward_batch_sizes(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []

    def hook(_module, _args, kwargs):
        sizes.append(int(kwargs["input_ids"].shape[0]))

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def _scores_per_step(
    model: Step1ForCausalLM, pair: PromptPair, *, seed: int, intensity: float, max_new_tokens: int
) -> tuple[GenerationResult, list[torch.Tensor]]:
    """Drive the decode loop by hand and keep each step's (1, V) scores after guidance (before the rule)."""
    loop = DecodeLoop(model)
    handle = loop.submit(pair, seed=seed, intensity=intensity, max_new_tokens=max_new_tokens)
    spec = SamplingSpec(intensity=intensity)
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        while loop.busy:
            loop.admit()
            assert loop.logits is not None
            seen.append(guided_scores(loop.logits, loop.first_rows(), spec).clone())
            loop.step()
    return handle.result(), seen


def _last_logits(model: Step1ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


# ---- fidelity with the reference ---------------------------------------------------------------


@pytest.mark.fixtures
def test_first_step_logits_match_the_reference_in_a_padded_batch(reference_dir):
    """Fixture strings -> our prompt ids -> the decode loop's first-step logits = the reference's."""
    editx = reference_dir / "bundle" / "Step-Audio-EditX"
    _, ref = load_reference(reference_dir, "step1_logits/lm_clone_short")
    cases = {c["name"]: c for c in json.loads((reference_dir / "prompt_ids" / "prompt_ids.json").read_text())["cases"]}
    tok = load_text_tokenizer(editx)  # the real public tokenizer files

    def pair(case: dict) -> PromptPair:
        return build_clone_prompt(
            tok,
            speaker=case["speaker"],
            prompt_text=case["prompt_text"],
            audio_token_str=case["audio_token_str"],
            target_text=case["target_text"],
        )

    short, long = pair(cases["lm_clone_short"]), pair(cases["clone"])
    assert short.cond == ref["input_ids"].tolist() and len(long.cond) > len(short.cond)
    model = Step1ForCausalLM.from_pretrained(editx, dtype=torch.float32).eval()
    logits, _ = prefill(model, LastLogits(model), [short.cond])  # how the loop starts every request
    want = torch.from_numpy(ref["logits_full"][-1])  # position 117: the prediction after the prompt
    assert (logits[0] - want).abs().max() <= 1e-4
    # beside a longer prompt in the running batch (short is then left-padded by 118 columns)
    results = generate(model, [long, short], do_sample=False, max_new_tokens=1)
    assert results[1].token_ids.tolist() == [int(ref["argmax_full"][-1])]


# ---- the repetition rule ---------------------------------------------------------------------


def test_repetition_rule_hand_made_cases():
    window = torch.tensor([
        [9, 8, 7, 6, 5, 4, 3, 2, 5, 5],  # last id 5 occurs 3 times: banned
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 5],  # last id 5 occurs twice: banned (2/10 > 0.1)
        [9, 8, 7, 6, 0, 4, 3, 2, 1, 5],  # last id occurs once: allowed
        [7, 7, 7, 7, 7, 7, 7, 7, 7, 5],  # 7 repeats but is not the last id: allowed
        [-1, -1, -1, -1, -1, -1, -1, 2, 5, 5],  # fewer than 10 ids: the rule waits, as the reference
    ])  # fmt: skip
    scores = torch.zeros(5, 12)
    out = repetition_rule(scores, window)
    banned = torch.isinf(out)
    assert banned.sum() == 2 and banned[0, 5] and banned[1, 5]
    assert torch.isneginf(out[banned]).all()


def test_repetition_rule_inside_generation(model, pairs):
    """X always wins, Y is second: the rule turns X X X ... into X X Y X Y X Y ..."""
    biased = _biased(model, {X: 3.0, Y: 2.5})
    (result,) = generate(biased, [pairs[1]], do_sample=False, max_new_tokens=9)
    assert result.token_ids.tolist() == [X, X, Y, X, Y, X, Y, X, Y]
    # the window includes the prompt: a prompt already ending in X, X bans X from the first step
    ended = PromptPair(cond=[*pairs[1].cond, X, X], uncond=pairs[1].uncond)
    (result,) = generate(biased, [ended], do_sample=False, max_new_tokens=3)
    assert result.token_ids.tolist() == [Y, X, Y]


def test_sampling_distribution_is_transformers_warpers(model, pairs):
    """Temperature 0.7 + top-k 50 + softmax as transformers computes them (the reference's stack)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    scores = torch.stack([_last_logits(model, p.cond) for p in pairs])
    warped = TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.7)(None, scores.clone()))
    hf = torch.softmax(warped, dim=-1)
    probs, ids = top_k_probs(scores, temperature=0.7, top_k=50)
    assert ids.shape == (3, 50) and (hf > 0).sum(dim=-1).tolist() == [50, 50, 50]
    torch.testing.assert_close(probs, hf.gather(1, ids), atol=1e-7, rtol=1e-6)
    full, none = top_k_probs(scores, temperature=0.7, top_k=None)
    assert none is None and torch.allclose(full, torch.softmax(scores / 0.7, dim=-1))


# ---- stopping and post-processing ------------------------------------------------------------


def test_postprocess_cases():
    a = AUDIO_ID_OFFSET
    assert postprocess([a + 1, a + 5119, 3]).tolist() == [1, 5119]  # EOT removed
    assert postprocess([a + 1, a + 2, 2]).tolist() == [1, 2]  # </s> is a stop too
    assert postprocess([a + 1, a + 2]).tolist() == [1, 2]  # no stop: the last real token stays
    assert postprocess([a + 7, 500, 0, a + 5120, 74751, a - 1, a + 8]).tolist() == [7, 8]  # non-audio dropped
    assert postprocess([a + 1, 3, a + 2, a + 3]).tolist() == [1]  # nothing after the stop
    assert postprocess([3]).tolist() == [] and postprocess(np.array([], dtype=np.int64)).tolist() == []
    assert postprocess([a, a + 3]).dtype == np.int64


@pytest.mark.parametrize("stop", [3, 2])
def test_generation_stops_on_eot_and_eos(model, pairs, stop):
    biased = _biased(model, {stop: 3.0, X: 2.5})
    (result,) = generate(biased, [pairs[0]], do_sample=False, max_new_tokens=20)
    assert result.stopped and result.token_ids.tolist() == [stop] and result.codes.size == 0


def test_length_limits_keep_every_real_token(model, pairs):
    biased = _biased(model, {X: 3.0, Y: 2.5})
    n_prompt = len(pairs[1].cond)
    (result,) = generate(biased, [pairs[1]], do_sample=False, max_length=n_prompt + 7)
    assert not result.stopped and len(result.token_ids) == 7
    assert result.codes.tolist() == [t - AUDIO_ID_OFFSET for t in result.token_ids]  # last one kept
    (capped,) = generate(biased, [pairs[1]], do_sample=False, max_new_tokens=4, max_length=n_prompt + 7)
    assert capped.token_ids.tolist() == result.token_ids[:4].tolist()
    with pytest.raises(InvalidInputError, match="no room under max_length") as err:
        generate(biased, [pairs[1]], max_length=n_prompt)
    assert err.value.param == "input"


# ---- seeds and batching ----------------------------------------------------------------------


def test_seeds_reproduce_and_differ(model, pairs):
    first = generate(model, [pairs[0]], seed=123, max_new_tokens=16)[0]
    again = generate(model, [pairs[0]], seed=123, max_new_tokens=16)[0]
    other = generate(model, [pairs[0]], seed=124, max_new_tokens=16)[0]
    assert first.seed == 123 and first.token_ids.tolist() == again.token_ids.tolist()
    assert first.token_ids.tolist() != other.token_ids.tolist()
    drawn = generate(model, [pairs[0]], max_new_tokens=16)[0]  # no seed: a fresh one, reported back
    replay = generate(model, [pairs[0]], seed=drawn.seed, max_new_tokens=16)[0]
    assert drawn.token_ids.tolist() == replay.token_ids.tolist()


def test_batched_greedy_equals_one_at_a_time(model, pairs):
    batched = generate(model, pairs, do_sample=False, max_new_tokens=16)
    for pair, got in zip(pairs, batched, strict=True):
        alone = generate(model, [pair], do_sample=False, max_new_tokens=16)[0]
        assert got.token_ids.tolist() == alone.token_ids.tolist()
    assert len({tuple(r.token_ids.tolist()) for r in batched}) == 3  # the prompts really differ


def test_batched_sampling_with_own_seeds_equals_alone(model, pairs):
    """Prompts that stop at different steps leave the batch; the others are unaffected."""
    stopper = _biased(model, {3: 0.7})  # EOT likely enough to end some rows early
    seeds = [11, 12, 13, 14]
    batch = [*pairs, pairs[0]]
    batched = generate(stopper, batch, seed=seeds, max_new_tokens=24)
    lengths = {len(r.token_ids) for r in batched}
    assert len(lengths) > 1 and any(r.stopped for r in batched)  # rows did finish at different steps
    for pair, s, got in zip(batch, seeds, batched, strict=True):
        alone = generate(stopper, [pair], seed=s, max_new_tokens=24)[0]
        assert got.token_ids.tolist() == alone.token_ids.tolist() and got.seed == s


# ---- intensity (classifier-free guidance) ----------------------------------------------------


def _reference_sampling(model, ids: list[int], seed: int, n: int, *, temperature=0.7, top_k=50) -> list[int]:
    """The reference's procedure written out plainly, with no cache: rule, temperature, top-k, draw."""
    g = torch.Generator().manual_seed(seed)
    seq, out = list(ids), []
    for _ in range(n):
        scores = _last_logits(model, seq).clone()
        window = torch.tensor(seq[-10:])
        if len(window) == 10 and (window == window[-1]).sum().float() / 10 > 0.1:
            scores[window[-1]] = float("-inf")
        values, ids = torch.topk(scores / temperature, top_k)
        token = int(ids[torch.multinomial(torch.softmax(values, -1)[None], 1, generator=g)])
        out.append(token)
        seq.append(token)
        if token in (2, 3):
            break
    return out


def test_intensity_one_is_the_plain_reference_path(model, pairs):
    sizes, handle = _forward_batch_sizes(model)
    try:
        results = generate(model, pairs[:2], seed=[5, 6], intensity=1.0, max_new_tokens=12)
    finally:
        handle.remove()
    assert sizes[:2] == [1, 1] and set(sizes[2:]) <= {1, 2}  # one row per prompt: no unconditional row ran
    for pair, s, got in zip(pairs[:2], [5, 6], results, strict=True):
        assert got.token_ids.tolist() == _reference_sampling(model, pair.cond, s, 12)
    # and the same call with the default intensity is the same computation, bit for bit
    _, scores_default = _scores_per_step(model, pairs[0], seed=5, intensity=1.0, max_new_tokens=3)
    loop = DecodeLoop(model)
    loop.submit(pairs[0], seed=5, max_new_tokens=3)
    with torch.inference_mode():
        loop.admit()
    assert loop.logits is not None and torch.equal(loop.logits[:1], scores_default[0])


def test_guidance_formula_on_real_logits(model, pairs):
    pair = pairs[1]
    cond, uncond = _last_logits(model, pair.cond), _last_logits(model, pair.uncond)
    assert (cond - uncond).abs().max() > 0.1  # the instruction really changes the prediction
    for s in (0.1, 0.5, 2.0, 3.0):
        assert torch.equal(guidance_logits(cond, uncond, s), uncond + s * (cond - uncond))
    assert torch.allclose(guidance_logits(cond, uncond, 1.0), cond, atol=1e-5)


@pytest.mark.parametrize("intensity", [0.5, 2.5])
def test_guided_generation_runs_one_batched_forward_and_applies_the_formula(model, pairs, intensity):
    sizes, handle = _forward_batch_sizes(model)
    try:
        result, seen = _scores_per_step(model, pairs[1], seed=3, intensity=intensity, max_new_tokens=3)
    finally:
        handle.remove()
    assert sizes == [2] * len(result.token_ids)  # cond + uncond rows together, one forward per step
    cond, uncond = pairs[1].cond, pairs[1].uncond
    for step, scores in enumerate(seen):
        done = result.token_ids[:step].tolist()  # both rows advanced with the same sampled tokens
        c, u = _last_logits(model, cond + done), _last_logits(model, uncond + done)
        want = u + intensity * (c - u)
        assert torch.allclose(scores[0], want, atol=1e-4, rtol=1e-5)
        assert (scores[0] - c).abs().max() > 0.05  # guidance moved the logits
    assert guidance_logits(c, u, intensity).shape == c.shape


def test_guided_batch_equals_guided_alone(model, pairs):
    batched = generate(model, pairs, seed=[1, 2, 3], intensity=2.0, max_new_tokens=10)
    for pair, s, got in zip(pairs, [1, 2, 3], batched, strict=True):
        alone = generate(model, [pair], seed=s, intensity=2.0, max_new_tokens=10)[0]
        assert got.token_ids.tolist() == alone.token_ids.tolist()
    plain = generate(model, pairs, seed=[1, 2, 3], max_new_tokens=10)
    assert any(a.token_ids.tolist() != b.token_ids.tolist() for a, b in zip(batched, plain, strict=True))


# ---- arguments -------------------------------------------------------------------------------


def test_bad_arguments_are_typed_errors(model, pairs):
    cases = [
        ({"intensity": 0.05}, "intensity"),
        ({"intensity": 3.5}, "intensity"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"seed": [1, 2]}, "seed"),
        ({"seed": -4}, "seed"),
        ({"max_new_tokens": 0}, "max_length"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidInputError) as err:
            generate(model, [pairs[0]], **kwargs)
        assert err.value.param == param, kwargs
    for bad in ([], [PromptPair(cond=[1, 99999], uncond=[1])], [PromptPair(cond=[], uncond=[1])]):
        with pytest.raises(InvalidInputError) as err:
            generate(model, bad)
        assert err.value.param == "input"


def test_results_carry_the_codes(model, pairs):
    biased = _biased(model, {X: 4.0, Y: 3.0})  # sampling: a wide margin keeps the order certain
    (result,) = generate(biased, [pairs[2]], seed=0, max_new_tokens=5)
    x, y = X - AUDIO_ID_OFFSET, Y - AUDIO_ID_OFFSET
    assert isinstance(result, GenerationResult) and not result.stopped and result.ending.value == "limit"
    assert result.codes.dtype == np.int64 and result.codes.tolist() == [x, x, y, x, y]


# ---- cancelling between steps ----------------------------------------------------------------


def test_a_cancel_ends_one_request_between_steps_and_leaves_the_others_alone(model, pairs):
    loop = DecodeLoop(model)
    handles = [loop.submit(pair, seed=s, max_new_tokens=16) for pair, s in zip(pairs, [7, 8, 9], strict=True)]
    with torch.inference_mode():
        while loop.busy:
            loop.step()
            if handles[1].steps_run == 5:
                handles[1].cancel()
    results = [h.result() for h in handles]
    full = generate(model, pairs, seed=[7, 8, 9], max_new_tokens=16)
    assert results[1].cancelled and not results[1].stopped
    assert results[1].token_ids.tolist() == full[1].token_ids.tolist()[:5]  # no id sampled after the cancel
    for i in (0, 2):
        assert results[i].token_ids.tolist() == full[i].token_ids.tolist() and not results[i].cancelled
