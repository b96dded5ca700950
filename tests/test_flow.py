"""Flow modules and the cosyvoice.yaml reader: official key names and shapes, the reshape rule,
relative-position attention against a direct formula, causal caches, and reader errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from bundles.vocoder_bundle import cosyvoice_yaml, random_state_dict
from errors import ModelLoadError
from vocoder import encoder
from vocoder.config import build_from_yaml, load_flow_state_dict, read_yaml
from vocoder.dit import BlockCache, CausalConvBlock
from vocoder.encoder import RelPositionalEncoding, RelPositionMultiHeadedAttention
from vocoder.flow import cosine_time_grid, reshape_mixed_codes

OFFICIAL_FLOW_KEYS = Path(__file__).resolve().parent / "data" / "checkpoint-keys" / "flow_keys.tsv"
OFFICIAL_FLOW_KEY_COUNT = 605  # docs/model.md §1.4
OFFICIAL_FLOW_PARAMS = 153_754_096


def _official_flow_shapes() -> dict[str, str]:
    rows = [line.split("\t") for line in OFFICIAL_FLOW_KEYS.read_text().splitlines()[1:] if line.strip()]
    return {key: shape for key, shape, _dtype in rows}


def _build(tmp_path: Path, size: str, *, meta: bool = False):
    path = tmp_path / f"{size}.yaml"
    path.write_text(cosyvoice_yaml(size))
    if meta:
        with torch.device("meta"):
            return build_from_yaml(path)
    return build_from_yaml(path)


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


# --- official names and shapes ---------------------------------------------------------------


def test_full_size_flow_has_official_key_count_and_parameter_count(tmp_path: Path) -> None:
    _, flow, _ = _build(tmp_path, "full", meta=True)
    state = flow.state_dict()
    assert len(state) == OFFICIAL_FLOW_KEY_COUNT
    assert sum(v.numel() for v in state.values()) == OFFICIAL_FLOW_PARAMS


def test_full_size_flow_reproduces_every_official_key_and_shape(tmp_path: Path) -> None:
    official = _official_flow_shapes()
    _, flow, _ = _build(tmp_path, "full", meta=True)
    ours = {k: str(list(v.shape)) for k, v in flow.state_dict().items()}
    assert ours == official


def test_full_size_yaml_gives_the_official_hift_keys_and_shapes(tmp_path: Path) -> None:
    official_path = OFFICIAL_FLOW_KEYS.with_name("hift_keys.tsv")
    rows = [line.split("\t") for line in official_path.read_text().splitlines()[1:] if line.strip()]
    _, _, hift = _build(tmp_path, "full", meta=True)
    assert {k: str(list(v.shape)) for k, v in hift.state_dict().items()} == {k: s for k, s, _ in rows}


def test_tiny_flow_keys_follow_the_official_naming_pattern(tmp_path: Path) -> None:
    official = _official_flow_shapes()
    _, flow, _ = _build(tmp_path, "tiny")
    tiny = set(flow.state_dict())
    assert {_pattern(k) for k in tiny} == {_pattern(k) for k in official}
    # every tiny key is literally an official key (tiny only has fewer layers)
    assert tiny <= set(official)


def test_random_state_dict_loads_strictly_and_is_seeded(tmp_path: Path) -> None:
    _, flow, _ = _build(tmp_path, "tiny")
    a = random_state_dict(flow, torch.Generator().manual_seed(1))
    b = random_state_dict(flow, torch.Generator().manual_seed(1))
    c = random_state_dict(flow, torch.Generator().manual_seed(2))
    load_flow_state_dict(flow, a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_flow_loader_names_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    _, flow, _ = _build(tmp_path, "tiny")
    state = flow.state_dict()
    missing = dict(state)
    missing.pop("encoder_proj.bias")
    with pytest.raises(ModelLoadError, match=r"encoder_proj\.bias"):
        load_flow_state_dict(flow, missing)
    extra = {**state, "decoder.rand_noise": torch.zeros(1)}
    with pytest.raises(ModelLoadError, match=r"decoder\.rand_noise"):
        load_flow_state_dict(flow, extra)
    wrong = {**state, "encoder_proj.bias": torch.zeros(81)}
    with pytest.raises(ModelLoadError, match=r"encoder_proj\.bias"):
        load_flow_state_dict(flow, wrong)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_flow_state_dict(flow, tmp_path / "absent.pt")


# --- the reshape rule (docs/model.md §4.3) ---------------------------------------------------


def test_reshape_full_groups() -> None:
    codes = [3, 7, 1024, 2000, 5119, 0, 1023, 1030, 1040, 1050]
    expected = [[3, 1025], [7, 2001], [1024, 5120], [0, 1031], [1023, 1041], [1024, 1051]]
    assert reshape_mixed_codes(codes).tolist() == expected


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        # len % 5 == 1: tail [0, 1024, 1024, 1024] -> b = 0, vq06 pads become 1025
        ([9], [[9, 1025], [0, 1025], [1024, 1025]]),
        # len % 5 == 2: tail [1024, 1024, 1024]
        ([9, 8], [[9, 1025], [8, 1025], [1024, 1025]]),
        # len % 5 == 3: tail [1024, 1024]
        ([9, 8, 1500], [[9, 1501], [8, 1025], [1024, 1025]]),
        # len % 5 == 4: tail [1024]
        ([9, 8, 1500, 1600], [[9, 1501], [8, 1601], [1024, 1025]]),
        # a full group followed by a partial one
        ([1, 2, 1100, 1200, 1300, 4], [[1, 1101], [2, 1201], [1024, 1301], [4, 1025], [0, 1025], [1024, 1025]]),
    ],
)
def test_reshape_pads_a_partial_group_like_the_reference(codes: list[int], expected: list[list[int]]) -> None:
    original = list(codes)
    out = reshape_mixed_codes(codes)
    assert out.dtype == torch.long
    assert out.tolist() == expected
    assert codes == original  # the reference mutates its input; we do not


# --- building blocks ---------------------------------------------------------------------------


def test_cosine_time_grid() -> None:
    grid = cosine_time_grid(10)
    assert grid.shape == (11,)
    assert grid[0] == 0 and abs(float(grid[-1]) - 1.0) < 1e-6
    steps = grid[1:] - grid[:-1]
    assert bool((steps[1:] > steps[:-1]).all())  # small steps near the noise end
    assert abs(float(grid[1]) - (1 - math.cos(0.05 * math.pi))) < 1e-7


def test_rel_position_attention_matches_the_direct_formula() -> None:
    """scores[i, j] = (q_i + u)·k_j + (q_i + v)·W_pos pe(i - j), pe(r) = [sin(r w_k), cos(r w_k)]."""
    torch.manual_seed(0)
    d, heads, t = 8, 2, 5
    attn = RelPositionMultiHeadedAttention(heads, d)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(1, t, d)
    _, pos_emb = RelPositionalEncoding(d)(x)
    out = attn(x, None, pos_emb)

    dk = d // heads
    freqs = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * -(math.log(10000.0) / d))
    xd = x.double()[0]
    q = (xd @ attn.linear_q.weight.double().T + attn.linear_q.bias.double()).view(t, heads, dk)
    k = (xd @ attn.linear_k.weight.double().T + attn.linear_k.bias.double()).view(t, heads, dk)
    v = (xd @ attn.linear_v.weight.double().T + attn.linear_v.bias.double()).view(t, heads, dk)
    ctx = torch.zeros(t, heads, dk, dtype=torch.float64)
    for h in range(heads):
        scores = torch.zeros(t, t, dtype=torch.float64)
        for i in range(t):
            for j in range(t):
                rel = float(i - j)
                pe = torch.zeros(d, dtype=torch.float64)
                pe[0::2] = torch.sin(rel * freqs)
                pe[1::2] = torch.cos(rel * freqs)
                p = (attn.linear_pos.weight.double() @ pe).view(heads, dk)[h]
                scores[i, j] = (
                    (q[i, h] + attn.pos_bias_u.double()[h]) @ k[j, h] + (q[i, h] + attn.pos_bias_v.double()[h]) @ p
                ) / math.sqrt(dk)
        ctx[:, h] = torch.softmax(scores, dim=-1) @ v[:, h]
    expected = ctx.reshape(t, d) @ attn.linear_out.weight.double().T + attn.linear_out.bias.double()
    torch.testing.assert_close(out[0].double(), expected, atol=1e-4, rtol=1e-4)


def test_query_blocks_and_sliced_tables_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = RelPositionMultiHeadedAttention(2, 8)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 11, 8)
    mask = torch.ones(2, 1, 11, dtype=torch.bool)
    mask[1, :, 8:] = False
    _, pos_emb = RelPositionalEncoding(8)(x)
    torch.testing.assert_close(pos_emb, encoder._rel_pos_table(8, 11))  # slice of the 5000-long table
    whole = attn(x, mask, pos_emb)
    monkeypatch.setattr(encoder, "ATTN_BLOCK_ABOVE", 4)
    monkeypatch.setattr(encoder, "ATTN_QUERY_BLOCK", 3)
    torch.testing.assert_close(attn(x, mask, pos_emb), whole)


def test_padding_mask_hides_padded_keys() -> None:
    torch.manual_seed(0)
    attn = RelPositionMultiHeadedAttention(2, 8)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[[True, True, True, True, False, False]]])
    _, pos_full = RelPositionalEncoding(8)(x)
    masked = attn(x, mask, pos_full)
    y = x.clone()
    y[:, 4:] = 100.0  # whatever the padded frames hold must not matter
    torch.testing.assert_close(attn(y, mask, pos_full)[:, :4], masked[:, :4])


def test_causal_conv_block_chunked_with_cache_equals_whole() -> None:
    torch.manual_seed(0)
    block = CausalConvBlock(8, 8)
    x = torch.randn(1, 10, 8)
    whole = block.block(x)  # the checkpoint's layout: channel-first Conv1d between transposes
    torch.testing.assert_close(block(x), whole)  # our time-major matmul form
    cache = BlockCache()
    parts = [block(x[:, a:b], cache) for a, b in ((0, 3), (3, 4), (4, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    assert cache.conv1.shape == (1, 2, 8) and cache.conv2.shape == (1, 2, 8)


# --- the yaml reader -------------------------------------------------------------------------


def test_reader_builds_the_tiny_yaml_with_its_dimensions(tmp_path: Path) -> None:
    mel_conf, flow, hift = _build(tmp_path, "tiny")
    assert (mel_conf.num_mels, mel_conf.n_fft, mel_conf.hop_size, mel_conf.sampling_rate) == (80, 1920, 480, 24000)
    assert mel_conf.fmax == 8000
    assert flow.input_embedding.embedding.weight.shape == (5121, 16)
    assert len(flow.encoder.encoders) == 2 and len(flow.encoder.up_encoders) == 2
    assert flow.decoder.inference_cfg_rate == pytest.approx(0.7)
    assert len(flow.decoder.estimator.blocks) == 2
    assert hift.upsample_scale == 480


def _yaml_with(tmp_path: Path, old: str, new: str) -> Path:
    text = cosyvoice_yaml("tiny")
    assert old in text
    path = tmp_path / "edited.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_reader_rejects_an_unknown_class_tag_by_name(tmp_path: Path) -> None:
    path = _yaml_with(tmp_path, "flow_matching.CausalConditionalCFM", "flow_matching.ConditionalCFM")
    with pytest.raises(ModelLoadError, match=r"unknown class tag !new:.*ConditionalCFM"):
        build_from_yaml(path)


def test_reader_rejects_unsupported_tags_and_bad_arguments(tmp_path: Path) -> None:
    path = _yaml_with(tmp_path, "inference_cfg_rate: 0.7", "inference_cfg_rate: !apply:eval ['0.7']")
    with pytest.raises(ModelLoadError, match="unsupported tag '!apply:eval'"):
        build_from_yaml(path)
    path = _yaml_with(tmp_path, "inference_cfg_rate: 0.7", "inference_cfg_rate: 0.7\n        sigma_min: 1e-6")
    with pytest.raises(ModelLoadError, match="cannot build CausalConditionalCFM"):
        build_from_yaml(path)
    path = _yaml_with(tmp_path, "selfattention_layer_type: 'rel_selfattn'", "selfattention_layer_type: 'selfattn'")
    with pytest.raises(ModelLoadError, match="selfattention_layer_type"):
        build_from_yaml(path)


def test_reader_resolves_refs_and_ignores_unused_top_level_keys(tmp_path: Path) -> None:
    text = cosyvoice_yaml("tiny").replace(
        "    sampling_rate: 24000\n    nsf_alpha", "    sampling_rate: !ref <sample_rate>\n    nsf_alpha"
    )
    text = "sample_rate: 24000\nllm: !new:some.module.NotOurs {a: 1}\n__set_seed: !apply:random.seed [1986]\n" + text
    path = tmp_path / "refs.yaml"
    path.write_text(text)
    _, _, hift = build_from_yaml(path)
    assert hift.sampling_rate == 24000
    assert set(read_yaml(path)) >= {"llm", "flow", "hift", "mel_conf"}


def test_reader_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        build_from_yaml(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("flow: [unclosed\n")
    with pytest.raises(ModelLoadError, match="not valid YAML"):
        build_from_yaml(bad)
    no_flow = tmp_path / "no_flow.yaml"
    no_flow.write_text("mel_conf: {num_mels: 80, n_fft: 1920, hop_size: 480, win_size: 1920, sampling_rate: 24000}\n")
    with pytest.raises(ModelLoadError, match="'flow' is missing"):
        build_from_yaml(no_flow)
