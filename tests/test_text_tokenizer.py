"""The Step1 text tokenizer: the real public model (exact ids) and the project-made stand-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from bundles.text_tokenizer_bundle import TOKENIZER_CONFIG, VOCAB_SIZE, write_text_tokenizer
from errors import ModelLoadError
from llm.text_tokenizer import (
    AUDIO_ID_OFFSET,
    BOS_ID,
    BOT_ID,
    EOS_ID,
    EOT_ID,
    StepTextTokenizer,
    load_text_tokenizer,
)


@pytest.fixture(scope="module")
def made_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("editx")
    write_text_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def made_tok(made_dir) -> StepTextTokenizer:
    return load_text_tokenizer(made_dir)


# ---- the real public tokenizer ------------------------------------------------------------


@pytest.mark.fixtures
def test_real_tokenizer_reproduces_reference_encode(step1_tokenizer_dir):
    tok = load_text_tokenizer(step1_tokenizer_dir)
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.encode("\n") == [1, 324, 78]
    assert tok.encode("<audio_0><audio_5119><audio_9215>") == [1, 324, 65536, 70655, 74751]
    # the reference's pieces for its system prompt head: "<s> ▁system <0x0A>"
    assert tok.encode("system\n")[:3] == [1, 2323, 78]
    # text right after an audio token gets no "▁" (dummy prefix only at the start)
    assert tok.pieces("<audio_3>hello") == ["▁", "<audio_3>", "hello"]


@pytest.mark.fixtures
def test_real_tokenizer_matches_reference_pieces(step1_tokenizer_dir, reference_dir):
    """Every reference prompt's ids decode to pieces the reference listed, one for one."""
    tok = load_text_tokenizer(step1_tokenizer_dir)
    cases = json.loads((reference_dir / "prompt_ids" / "prompt_ids.json").read_text())["cases"]
    for case in cases:
        assert [tok.id_to_piece(i) for i in case["token_ids"]] == case["tokens"], case["name"]


# ---- the project-made tokenizer -------------------------------------------------------------


def test_made_tokenizer_has_the_official_layout(made_dir, made_tok):
    m = sp_pb2.ModelProto()
    m.ParseFromString((made_dir / "tokenizer.model").read_bytes())
    Piece = sp_pb2.ModelProto.SentencePiece
    assert len(m.pieces) == VOCAB_SIZE == made_tok.vocab_size
    assert m.trainer_spec.byte_fallback
    assert m.normalizer_spec.add_dummy_prefix and not m.normalizer_spec.remove_extra_whitespaces
    assert [(m.pieces[i].piece, m.pieces[i].type) for i in range(5)] == [
        ("<unk>", Piece.UNKNOWN),
        ("<s>", Piece.CONTROL),
        ("</s>", Piece.CONTROL),
        ("<|EOT|>", Piece.CONTROL),
        ("<|BOT|>", Piece.CONTROL),
    ]
    assert (m.pieces[78].piece, m.pieces[78].type) == ("<0x0A>", Piece.BYTE)
    assert m.pieces[324].piece == "▁"
    for n in (0, 1, 1023, 1024, 5119, 5120, VOCAB_SIZE - AUDIO_ID_OFFSET - 1):
        p = m.pieces[AUDIO_ID_OFFSET + n]
        assert (p.piece, p.type) == (f"<audio_{n}>", Piece.USER_DEFINED)
    assert json.loads((made_dir / "tokenizer_config.json").read_text()) == TOKENIZER_CONFIG


@pytest.mark.fixtures
def test_made_config_has_the_official_keys(made_dir, step1_tokenizer_dir):
    official = json.loads((step1_tokenizer_dir / "tokenizer_config.json").read_text())
    assert json.loads((made_dir / "tokenizer_config.json").read_text()) == official


def test_made_tokenizer_encodes_like_the_reference_convention(made_tok):
    assert made_tok.encode("\n") == [BOS_ID, 324, 78]
    ids = made_tok.encode("Make the audio more happy.\n<audio_5><audio_1030><audio_5119>\n")
    assert ids[0] == BOS_ID
    assert ids[-4:] == [AUDIO_ID_OFFSET + 5, AUDIO_ID_OFFSET + 1030, AUDIO_ID_OFFSET + 5119, 78]
    pieces = made_tok.pieces("Make the audio more happy.")
    assert pieces == ["▁Make", "▁the", "▁audio", "▁more", "▁happy", "."]
    # turn markers written in user text stay text: they never become control ids
    assert not {BOS_ID, EOS_ID, EOT_ID, BOT_ID} & set(made_tok.encode("<s></s><|EOT|><|BOT|>")[1:])


@pytest.mark.parametrize(
    "text",
    ["hello world", "  two  spaces\tand tab\n", "Ünïcödé 你好 한국어 😀", "speaker prompt text: \n", "x<audio_7>y"],
)
def test_made_tokenizer_round_trips(made_tok, text):
    ids = made_tok.encode(text)
    assert ids[0] == BOS_ID and 0 not in ids  # byte fallback: never <unk>
    assert made_tok.decode(ids) == text


def test_config_can_turn_bos_off(made_dir, tmp_path):
    shutil.copy(made_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_text_tokenizer(tmp_path).encode("\n") == [324, 78]
    (tmp_path / "tokenizer_config.json").unlink()  # no config: the Llama defaults
    assert load_text_tokenizer(tmp_path).encode("\n") == [BOS_ID, 324, 78]


def test_loader_errors_are_typed(made_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.model"):
        load_text_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_text_tokenizer(tmp_path)
    shutil.copy(made_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        load_text_tokenizer(tmp_path)


def test_loader_refuses_a_model_with_other_ids(made_dir, tmp_path):
    m = sp_pb2.ModelProto()
    m.ParseFromString((made_dir / "tokenizer.model").read_bytes())
    m.pieces[3].piece, m.pieces[4].piece = "<|BOT|>", "<|EOT|>"  # swapped turn markers
    del m.pieces[AUDIO_ID_OFFSET + 100 :]  # and too few audio pieces
    (tmp_path / "tokenizer.model").write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"<\|EOT\|> is id 4.*<audio_5119>"):
        load_text_tokenizer(tmp_path)
