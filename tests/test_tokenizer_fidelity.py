"""wav2token against the reference's own outputs (../shared/data/reference-fixtures, dither 0).

Stage by stage, each stage fed with the reference's input to it: prompt -> 16 kHz preprocessed
audio -> (vq02 LFR features -> encoder output -> codes; vq06 log-mel -> codes) -> interleave.
Tokens must match exactly; floats within the tolerances of docs/model.md §8.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audio import decode_audio, prepare_prompt
from tests.conftest import load_reference
from tokenizer import StepAudioTokenizer, preprocess_wav, quantize

pytestmark = pytest.mark.fixtures

CASES = [("a", "a_piper_en_22k.wav"), ("b", "b_synth_48k_stereo.wav")]


@pytest.fixture(scope="module")
def ref_tok(reference_dir) -> StepAudioTokenizer:
    return StepAudioTokenizer(reference_dir / "bundle" / "Step-Audio-Tokenizer", dither=0.0)


@pytest.mark.parametrize(("case", "name"), CASES)
def test_tokens_match_the_reference_exactly(reference_dir, ref_tok, case, name):
    meta, ref = load_reference(reference_dir, f"wav2token/{case}")
    wav, sr = decode_audio((reference_dir / "inputs" / name).read_bytes())
    assert sr == meta["wav2token_sr"]
    prompt = prepare_prompt(wav, sr)
    np.testing.assert_array_equal(prompt.numpy(), ref["wav2token_input"])

    tokens = ref_tok.wav2token(prompt, sr)
    np.testing.assert_array_equal(tokens.vq02, ref["vq02"])
    np.testing.assert_array_equal(tokens.vq06, ref["vq06"])
    np.testing.assert_array_equal(tokens.speech_ids, ref["speech_tokens"])
    np.testing.assert_array_equal(tokens.prompt_codes, meta["prompt_codes_for_flow"])
    assert tokens.token_str == meta["token_str"]


@pytest.mark.parametrize(("case", "name"), CASES)
def test_intermediate_stages_match(reference_dir, ref_tok, case, name):
    _, ref = load_reference(reference_dir, f"wav2token/{case}")
    sr = json.loads((reference_dir / f"wav2token/{case}.json").read_text())["wav2token_sr"]

    audio16k = preprocess_wav(torch.from_numpy(ref["wav2token_input"]), sr)
    assert audio16k.shape == ref["audio16k"].shape
    assert np.abs(audio16k.numpy() - ref["audio16k"]).max() <= 5e-5

    reference_audio = torch.from_numpy(ref["audio16k"][0])
    mels = ref_tok.vq06_tokenizer.mels(reference_audio)
    assert [m.shape[1] for m in mels] == ref["vq06_mel_chunk_lens"].tolist()
    mel = torch.cat(mels, dim=1).numpy()
    assert np.abs(mel - ref["vq06_mel"]).max() <= 1e-4
    vq06 = ref_tok.vq06_tokenizer.encode_mel(torch.from_numpy(ref["vq06_mel"]))
    np.testing.assert_array_equal(vq06, ref["vq06"])

    enc = ref_tok.vq02_encoder.encode(reference_audio)
    assert enc.chunk_frames == ref["vq02_feat_chunk_lens"].tolist()
    assert np.abs(enc.features.numpy() - ref["vq02_feats"]).max() <= 5e-4
    assert np.abs(enc.hidden.numpy() - ref["vq02_enc_out"]).max() <= 1e-3
    assert torch.equal(enc.hidden, ref_tok.vq02_encoder.encode(reference_audio, layer_major=False).hidden)
    np.testing.assert_array_equal(quantize(torch.from_numpy(ref["vq02_enc_out"]), ref_tok.codebook), ref["vq02"])
