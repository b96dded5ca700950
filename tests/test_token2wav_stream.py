"""The streaming vocoder session on the tiny bundle: feed invariance and each of the reference's caller traps.

The reference's caller interface makes the audio depend on how codes are split across calls,
returns nothing when everything arrives in one final call or when fewer than 5 codes arrive,
leaks the session when that happens, and has fixed-size cache buffers. Each test here pins one
of those down in our session.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from errors import InvalidInputError
from model_files import EDITX_DIR, VOCODER_DIR
from vocoder.encoder import POS_TABLE_STEP, ConformerCache, rel_pos_table
from vocoder.stream import Token2WavStream
from vocoder.token2wav import Token2Wav

SAMPLES_PER_FRAME = 480
SEED = 11


def mixed_codes(groups: int, seed: int) -> np.ndarray:
    """``groups`` LLM groups of 2 vq02 (0..1023) + 3 vq06 (1024..5119) codes."""
    rng = np.random.default_rng(seed)
    out = [np.concatenate([rng.integers(0, 1024, 2), rng.integers(1024, 5120, 3)]) for _ in range(groups)]
    return np.concatenate(out).astype(np.int64)


@pytest.fixture(scope="module")
def t2w(tiny_bundle: Path) -> Token2Wav:
    torch.set_num_threads(2)
    return Token2Wav.from_dir(tiny_bundle / EDITX_DIR / VOCODER_DIR)


@pytest.fixture(scope="module")
def prompt() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "prompt_codes": mixed_codes(4, seed=1),  # 12 token frames -> 24 mel frames
        "prompt_mel": (rng.normal(size=(1, 27, 80)) - 5.0).astype(np.float32),
        "spk_emb": rng.normal(size=(1, 192)).astype(np.float32),
    }


# 32 groups: chunks of 25, 40, 80 codes (the third one triggers the DiT cache truncation), then the rest
CODES = mixed_codes(32, seed=2)


def session(t2w: Token2Wav, prompt: dict[str, np.ndarray], **kwargs: object) -> Token2WavStream:
    return Token2WavStream(t2w, prompt["prompt_codes"], prompt["prompt_mel"], prompt["spk_emb"], seed=SEED, **kwargs)


def stream_in_steps(t2w: Token2Wav, prompt: dict[str, np.ndarray], codes: np.ndarray, step: int) -> list[np.ndarray]:
    with session(t2w, prompt) as s:
        pieces = [p for i in range(0, len(codes), step) for p in s.feed(codes[i : i + step])]
        return pieces + s.finish()


@pytest.fixture(scope="module")
def by_group(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The reference's own way of calling: one 5-code group per call."""
    return stream_in_steps(t2w, prompt, CODES, 5)


def test_streamed_length_is_480_samples_per_mel_frame(t2w: Token2Wav, by_group: list[np.ndarray]) -> None:
    assert sum(p.size for p in by_group) == t2w.mel_frames(len(CODES)) * SAMPLES_PER_FRAME
    assert all(p.dtype == np.float32 and p.ndim == 1 for p in by_group)
    assert len(by_group) == 4  # chunks of 15, 24, 48 token frames and the last one
    assert np.isfinite(np.concatenate(by_group)).all()


@pytest.mark.parametrize("step", [1, 7])
def test_audio_does_not_depend_on_how_the_codes_are_split(
    t2w: Token2Wav, prompt: dict[str, np.ndarray], by_group: list[np.ndarray], step: int
) -> None:
    pieces = stream_in_steps(t2w, prompt, CODES, step)
    assert [p.size for p in pieces] == [p.size for p in by_group]
    assert np.array_equal(np.concatenate(pieces), np.concatenate(by_group))


def test_one_call_with_everything_synthesises_chunk_by_chunk(
    t2w: Token2Wav, prompt: dict[str, np.ndarray], by_group: list[np.ndarray]
) -> None:
    with session(t2w, prompt, record=True) as s:
        pieces = s.feed(CODES)
        assert [p.size for p in pieces] == [p.size for p in by_group[:-1]]
        assert [r.codes for r in s.chunk_records] == [(0, 30), (25, 70), (65, 150)]
        assert s.chunk_records[2].cache_frames_out > s.chunk_records[2].cache_frames_kept  # truncated
        last = s.finish()
    assert np.array_equal(np.concatenate(pieces + last), np.concatenate(by_group))


def test_one_final_call_with_everything_still_produces_the_audio(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    """The reference's setup call returns nothing, even as the final call; ours flushes at finish()."""
    codes = CODES[:20]
    with session(t2w, prompt) as s:
        s.feed(codes)
        audio = np.concatenate(s.finish())
    assert audio.size == t2w.mel_frames(len(codes)) * SAMPLES_PER_FRAME
    assert np.array_equal(audio, np.concatenate(stream_in_steps(t2w, prompt, codes, 1)))


def test_finish_right_after_the_setup_produces_the_audio(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    with session(t2w, prompt, record=True) as s:
        assert s.feed(CODES[:5]) == []
        assert s.setup_record is not None  # the setup has run
        audio = np.concatenate(s.finish())
    assert audio.size == 6 * SAMPLES_PER_FRAME
    assert float(np.abs(audio).max()) > 0


@pytest.mark.parametrize("n_codes", [1, 3, 4])
def test_fewer_than_one_group_still_produces_the_audio(
    t2w: Token2Wav, prompt: dict[str, np.ndarray], n_codes: int
) -> None:
    """The reference never sets up below 5 codes; we set up on the padded partial group at finish()."""
    with session(t2w, prompt) as s:
        assert s.feed(CODES[:n_codes]) == []
        audio = np.concatenate(s.finish())
    assert audio.size == t2w.mel_frames(n_codes) * SAMPLES_PER_FRAME == 6 * SAMPLES_PER_FRAME
    assert float(np.abs(audio).max()) > 0


def test_no_codes_at_all_gives_no_audio_and_closes(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    s = session(t2w, prompt)
    assert s.feed([]) == []
    assert s.finish() == []
    assert s.closed


def test_state_is_released_by_finish_close_and_the_context_manager(
    t2w: Token2Wav, prompt: dict[str, np.ndarray]
) -> None:
    s = session(t2w, prompt)
    s.feed(CODES[:10])
    cache = weakref.ref(s._flow.cache)  # the flow caches, which the reference leaked in a shared dict
    s.finish()
    gc.collect()
    assert s.closed and cache() is None
    with pytest.raises(RuntimeError):
        s.feed(CODES[:5])

    with pytest.raises(KeyError), session(t2w, prompt) as s2:
        s2.feed(CODES[:5])
        cache = weakref.ref(s2._flow.cache)
        raise KeyError("the caller failed mid-stream")
    gc.collect()
    assert s2.closed and cache() is None

    s3 = session(t2w, prompt)
    s3.feed(CODES[:5])
    s3.close()
    s3.close()  # idempotent
    with pytest.raises(RuntimeError):
        s3.finish()


def test_a_failing_chunk_closes_the_session(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    n_prompt = 24  # 12 prompt token frames
    s = session(t2w, prompt, noise=np.zeros((1, 80, n_prompt + 10), np.float32))  # too short for chunk 0
    s.feed(CODES[:5])
    with pytest.raises(InvalidInputError, match="noise"):
        s.feed(CODES[5:30])
    assert s.closed


def test_bad_codes_are_rejected_without_losing_the_session(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    with session(t2w, prompt) as s:
        for bad in ([5120], [-1], [1.5], [[1, 2], [3, 4]]):
            with pytest.raises(InvalidInputError):
                s.feed(bad)
        assert not s.closed and s.codes_received == 0


def test_seeds_make_the_audio_reproducible(t2w: Token2Wav, prompt: dict[str, np.ndarray]) -> None:
    codes = CODES[:10]  # setup + the last chunk: both the flow noise and the HiFT draws matter

    def run(**kwargs: object) -> np.ndarray:
        with Token2WavStream(t2w, prompt["prompt_codes"], prompt["prompt_mel"], prompt["spk_emb"], **kwargs) as s:
            return np.concatenate(s.feed(codes) + s.finish())

    same = run(seed=3)
    assert np.array_equal(same, run(seed=3))
    assert not np.array_equal(same, run(seed=4))
    assert not np.array_equal(same, run(seed=3, hift_seed=99))  # HiFT draws change, the flow does not


def test_a_prompt_longer_than_the_references_cache_buffers_works(t2w: Token2Wav) -> None:
    """The reference's DiT caches hold 1000 frames, so prompts above ~16 s fail there; 30 s works here."""
    rng = np.random.default_rng(3)
    groups = 250  # 750 token frames = 1500 mel frames = 30 s
    prompt_mel = (rng.normal(size=(1, 1500, 80)) - 5.0).astype(np.float32)
    with Token2WavStream(t2w, mixed_codes(groups, 5), prompt_mel, rng.normal(size=192), seed=1, record=True) as s:
        pieces = s.feed(CODES[:10]) + s.finish()
        assert s.setup_record is not None and s.setup_record.noise.size(2) == 1500
    assert sum(p.size for p in pieces) == t2w.mel_frames(10) * SAMPLES_PER_FRAME


def test_the_conformer_cache_grows_past_the_references_position_table(t2w: Token2Wav) -> None:
    """The reference's relative-position table stops at 5000 frames (100 s); ours is computed for any length.

    A cache of 2600 token frames (5200 up-sampled frames) is built in one step, then a normal
    chunk follows; the table used for it is the same sinusoid, sliced at its centre.
    """
    flow = t2w.flow
    cache = ConformerCache()
    long = torch.from_numpy(np.stack([np.arange(2603) % 1024, 1025 + np.arange(2603) % 4096], axis=1))[None]
    chunk = long[:, :18]
    with torch.inference_mode():
        flow.encoder.forward_chunk(flow.input_embedding(long), cache, last_chunk=False)
        assert cache.frames * flow.up_rate > POS_TABLE_STEP
        h = flow.encoder.forward_chunk(flow.input_embedding(chunk), cache, last_chunk=False)
    assert h.shape == (1, 30, flow.encoder.output_size()) and bool(torch.isfinite(h).all())
    d = flow.encoder.output_size()
    big, small = rel_pos_table(d, 2 * POS_TABLE_STEP + 7), rel_pos_table(d, 40)
    centre = big.size(1) // 2
    assert torch.equal(big[:, centre - 39 : centre + 40], small)
