"""The streaming vocoder against the reference's ``token2wav_stream`` fixtures (README §8); skipped without ../shared.

Each case is run once through our session the way the reference runner fed it (``feed`` codes
per call, then an empty final call), with the recorded noise buffer and HiFT seed. Then:

* call events, emitted lengths, chunk boundaries, code ranges, noise windows and DiT cache
  lengths before/after truncation are compared exactly;
* the flow is checked per chunk from the codes (setup included), the encoder on its own;
* HiFT is checked in stages, each on the reference's output of the previous stage (f0, source,
  decode, fade, one chunk), then the whole streaming HiFT on the reference's flow mels, then the
  whole session from the codes (README §8.7 tolerances).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_reference
from vocoder.encoder import ConformerCache
from vocoder.hift import HiftDraws, draw_hift_noise
from vocoder.stream import HiftStream, Token2WavStream, crossfade, fade_window
from vocoder.token2wav import Token2Wav

pytestmark = pytest.mark.fixtures

CASES = ("t2ws_feed5", "t2ws_feed1", "t2ws_long_feed5")
FLOW_TOL = 1e-4  # flow_mu and flow_mel from the codes (floors 2.5e-6 and 1.0e-5)
F0_TOL = 5e-4  # Hz, from the reference hift_mel_in (floor 6.6e-5)
SOURCE_TOL = 1e-3  # from the reference f0 + draws + previous source tail (floor 5.3e-5)
DECODE_TOL = 1e-4  # decode(reference mel_in, reference source) (floor 2.7e-6)
FADE_TOL = 1e-6  # the faded head from the reference speech_raw and previous tail (floor 5.2e-8)
WAVE_REL_TOL = 1e-2  # x max|speech|: one HiFT chunk, streaming HiFT on reference mels, codes end to end


@dataclass
class Run:
    meta: dict
    ref: dict[str, np.ndarray]
    session: Token2WavStream
    calls: list[list[np.ndarray]]  # the pieces each call returned


@pytest.fixture(scope="module")
def t2w(reference_dir: Path) -> Token2Wav:
    torch.set_num_threads(2)
    return Token2Wav.from_dir(reference_dir / "bundle" / "Step-Audio-EditX" / "CosyVoice-300M-25Hz")


def _noise(reference_dir: Path, meta: dict) -> np.ndarray:
    return np.load(reference_dir / meta["noise"]["source"].replace("<set>/", ""))


@pytest.fixture(scope="module")
def runs(reference_dir: Path, t2w: Token2Wav) -> dict[str, Run]:
    _, frontend = load_reference(reference_dir, "frontend/a")
    out: dict[str, Run] = {}
    for case in CASES:
        meta, ref = load_reference(reference_dir, f"token2wav_stream/{case}")
        assert meta["final_call"] == "empty"
        session = Token2WavStream(
            t2w,
            ref["prompt_codes"],
            frontend["speech_feat"],
            frontend["speech_embedding"],
            noise=_noise(reference_dir, meta),
            hift_seed=meta["hift"]["seed"],
            record=True,
        )
        codes, feed = ref["token_codes"], int(meta["feed"])
        calls = [session.feed(codes[i : i + feed]) for i in range(0, len(codes), feed)]
        calls.append(session.finish())
        out[case] = Run(meta, ref, session, calls)
    return out


def _chunks(run: Run) -> int:
    return len(run.meta["chunks"])


# ---- call events, boundaries, schedule: exact ---------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_call_events_and_chunk_boundaries_are_exact(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    returned = [sum(p.size for p in pieces) if pieces else -1 for pieces in run.calls]
    assert returned == run.ref["call_returned_samples"].tolist()
    assert [len(c) for c in run.calls if c] == [1] * _chunks(run)  # one piece per chunk, here
    bounds = np.cumsum([0] + [p.size for pieces in run.calls for p in pieces])
    assert bounds.tolist() == run.ref["chunk_output_bounds"].tolist()
    assert [i for i, pieces in enumerate(run.calls) if pieces] == run.ref["chunk_call"].tolist()
    assert [r.hift.emitted for r in run.session.chunk_records] == [c["emitted_samples"] for c in run.meta["chunks"]]
    assert run.session.closed


@pytest.mark.parametrize("case", CASES)
def test_chunk_schedule_noise_windows_and_cache_truncation_are_exact(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    records = run.session.chunk_records
    assert len(records) == _chunks(run)
    for rec, chunk in zip(records, run.meta["chunks"], strict=True):
        assert list(rec.codes) == chunk["target_codes"]
        assert rec.last == chunk["last_chunk"]
        assert rec.token.size(1) == chunk["flow_token_frames"]
        assert rec.mel.size(2) == chunk["flow_mel_frames"]
        assert [rec.noise_offset, rec.noise_offset + rec.noise.size(2)] == chunk["noise_frames"]
        assert rec.cache_frames_in == chunk["estimator_att_len_in"]
        assert rec.cache_frames_out == chunk["estimator_att_len_out"]
        assert rec.cache_frames_kept == chunk["estimator_att_len_after_truncation"]
        assert rec.hift.mel_in.size(2) == chunk["hift_mel_in_frames"]
        assert rec.hift.seed == chunk["hift_seed"]
        assert np.array_equal(rec.token.numpy(), run.ref[f"c{rec.index}__flow_token"])
    assert np.array_equal(run.session.setup_record.token.numpy(), run.ref["setup__flow_token"])


def test_the_long_case_truncates_and_reuses_the_frozen_noise_window(runs: dict[str, Run]) -> None:
    """Guards the test above: the long case really exercises truncation and the frozen window."""
    records = runs["t2ws_long_feed5"].session.chunk_records
    assert records[2].cache_frames_out > records[2].cache_frames_kept
    assert records[3].noise_offset == records[2].cache_frames_kept


# ---- flow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["t2ws_feed5", "t2ws_long_feed5"])
def test_setup_receives_and_makes_what_the_reference_did(runs: dict[str, Run], case: str) -> None:
    run, setup = runs[case], runs[case].session.setup_record
    assert setup is not None
    assert np.array_equal(setup.prompt_feat.numpy(), run.ref["setup__prompt_feat"])
    assert np.array_equal(setup.embedding.numpy(), run.ref["setup__embedding"])
    assert np.array_equal(setup.noise.numpy(), run.ref["setup__flow_noise"])
    assert float(np.abs(setup.feat.numpy() - run.ref["setup__feat"]).max()) <= FLOW_TOL


@pytest.mark.parametrize("case", CASES)
def test_flow_mel_per_chunk_from_the_codes(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    for rec in run.session.chunk_records:
        k = rec.index
        if f"c{k}__flow_noise" in run.ref:
            assert np.array_equal(rec.noise.numpy(), run.ref[f"c{k}__flow_noise"])
        assert float(np.abs(rec.mel.numpy() - run.ref[f"c{k}__flow_mel"]).max()) <= FLOW_TOL, f"chunk {k}"


@pytest.mark.parametrize("case", ["t2ws_feed5", "t2ws_long_feed5"])
def test_streaming_encoder_mu_per_chunk(t2w: Token2Wav, runs: dict[str, Run], case: str) -> None:
    run, flow = runs[case], t2w.flow
    cache = ConformerCache()
    steps = [("setup", run.ref["setup__flow_token"], False)]
    steps += [(f"c{k}", run.ref[f"c{k}__flow_token"], k == _chunks(run) - 1) for k in range(_chunks(run))]
    with torch.inference_mode():
        for name, token, last in steps:
            h = flow.encoder.forward_chunk(flow.input_embedding(torch.from_numpy(token)), cache, last_chunk=last)
            mu = flow.encoder_proj(h).transpose(1, 2)
            assert float((mu - torch.from_numpy(run.ref[f"{name}__flow_mu"])).abs().max()) <= FLOW_TOL, name


# ---- HiFT, staged on the reference's own inputs -------------------------------------------------


def _ref_faded(ref: dict[str, np.ndarray], k: int) -> torch.Tensor:
    """The reference's chunk-k speech after its fade (the head is stored separately from k = 1)."""
    speech = torch.from_numpy(ref[f"c{k}__speech_raw"]).clone()
    if k > 0:
        head = torch.from_numpy(ref[f"c{k}__speech_faded_head"])
        speech[:, : head.size(1)] = head
    return speech


def _ref_draws(ref: dict[str, np.ndarray], k: int) -> HiftDraws:
    return HiftDraws(torch.from_numpy(ref[f"c{k}__hift_rand_ini"]), torch.from_numpy(ref[f"c{k}__hift_sine_noise"]))


@pytest.mark.parametrize("case", ["t2ws_feed5", "t2ws_long_feed5"])
def test_hift_f0_from_the_reference_mel_in(t2w: Token2Wav, runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    with torch.inference_mode():
        for k in range(_chunks(run)):
            f0 = t2w.hift.predict_f0(torch.from_numpy(run.ref[f"c{k}__hift_mel_in"]))
            assert float((f0 - torch.from_numpy(run.ref[f"c{k}__hift_f0"])).abs().max()) <= F0_TOL


@pytest.mark.parametrize("case", CASES)
def test_hift_mel_in_is_the_mel_cache_plus_the_chunk(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    records = run.session.chunk_records
    for rec in records:
        prev = [] if rec.index == 0 else [records[rec.index - 1].hift.mel_in[:, :, -8:]]
        assert torch.equal(rec.hift.mel_in, torch.cat([*prev, rec.mel], dim=2))
        if f"c{rec.index}__hift_mel_in" in run.ref:
            assert float(np.abs(rec.hift.mel_in.numpy() - run.ref[f"c{rec.index}__hift_mel_in"]).max()) <= FLOW_TOL


def test_hift_source_decode_fade_and_chunk_stages(t2w: Token2Wav, runs: dict[str, Run]) -> None:
    ref = runs["t2ws_feed5"].ref
    window = fade_window(3840)
    assert np.array_equal(window.numpy(), ref["speech_window"])
    with torch.inference_mode():
        for k in range(_chunks(runs["t2ws_feed5"])):
            mel_in = torch.from_numpy(ref[f"c{k}__hift_mel_in"])
            source_ref = torch.from_numpy(ref[f"c{k}__hift_source"])
            prev_source = None if k == 0 else torch.from_numpy(ref[f"c{k - 1}__hift_source"])[:, :, -3840:]
            source = t2w.hift.source_from_f0(torch.from_numpy(ref[f"c{k}__hift_f0"]), draws=_ref_draws(ref, k))
            if prev_source is not None:
                source[:, :, :3840] = prev_source
            assert float((source - source_ref).abs().max()) <= SOURCE_TOL, f"source {k}"
            raw_ref = torch.from_numpy(ref[f"c{k}__speech_raw"])
            raw = t2w.hift.decode(mel_in, source_ref)
            assert float((raw - raw_ref).abs().max()) <= DECODE_TOL, f"decode {k}"
            chunk, _ = t2w.hift.inference_with_source(mel_in, draws=_ref_draws(ref, k), cache_source=prev_source)
            assert float((chunk - raw_ref).abs().max()) <= WAVE_REL_TOL * float(raw_ref.abs().max()), f"chunk {k}"
            if k > 0:
                faded = crossfade(raw_ref[:, :3840], _ref_faded(ref, k - 1)[:, -3840:], window)
                expected = torch.from_numpy(ref[f"c{k}__speech_faded_head"])
                assert float((faded - expected).abs().max()) <= FADE_TOL, f"fade {k}"


@pytest.mark.parametrize("case", CASES)
def test_hift_draws_follow_the_per_chunk_seed_protocol(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    for k, chunk in enumerate(run.meta["chunks"]):
        n_samples = 480 * chunk["hift_mel_in_frames"]
        draws = draw_hift_noise(1, n_samples, 9, torch.Generator().manual_seed(run.meta["hift"]["seed"] + k))
        assert np.array_equal(draws.rand_ini.numpy(), run.ref[f"c{k}__hift_rand_ini"])
        assert np.array_equal(run.session.chunk_records[k].hift.rand_ini.numpy(), run.ref[f"c{k}__hift_rand_ini"])
        if f"c{k}__hift_sine_noise" in run.ref:
            assert np.array_equal(draws.sine_noise.numpy(), run.ref[f"c{k}__hift_sine_noise"])
        recorded = [d["sha256_c_order_f32"] for d in chunk.get("draws", [])]
        if recorded:
            ours = [draws.rand_ini, draws.sine_noise, draws.source_noise]
            assert [hashlib.sha256(d.contiguous().numpy().tobytes()).hexdigest() for d in ours] == recorded


@pytest.mark.parametrize("case", ["t2ws_feed5", "t2ws_long_feed5"])
def test_streaming_hift_on_the_reference_flow_mels(t2w: Token2Wav, runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    n = _chunks(run)
    injected = [_ref_draws(run.ref, k) for k in range(n)] if "c0__hift_sine_noise" in run.ref else None
    hift = HiftStream(t2w.hift, hift_seed=run.meta["hift"]["seed"], draws=injected)
    pieces = [hift.process(torch.from_numpy(run.ref[f"c{k}__flow_mel"]), last=k == n - 1)[0] for k in range(n)]
    assert np.cumsum([0] + [p.numel() for p in pieces]).tolist() == run.ref["chunk_output_bounds"].tolist()
    expected = torch.from_numpy(run.ref["speech_stream"][0])
    speech = torch.cat(pieces)
    assert float((speech - expected).abs().max()) <= WAVE_REL_TOL * float(expected.abs().max())


@pytest.mark.parametrize("case", CASES)
def test_speech_stream_from_the_codes_end_to_end(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    speech = np.concatenate([p for pieces in run.calls for p in pieces])
    expected = run.ref["speech_stream"][0]
    assert speech.dtype == np.float32 and speech.shape == expected.shape
    assert float(np.abs(speech - expected).max()) <= WAVE_REL_TOL * float(np.abs(expected).max())


def test_feed1_and_feed5_give_the_same_audio_as_the_reference_says(runs: dict[str, Run]) -> None:
    def audio(case: str) -> np.ndarray:
        return np.concatenate([p for pieces in runs[case].calls for p in pieces])

    assert np.array_equal(audio("t2ws_feed1"), audio("t2ws_feed5"))
    assert np.array_equal(runs["t2ws_feed1"].ref["speech_stream"], runs["t2ws_feed5"].ref["speech_stream"])
