"""Writes an openai-whisper checkpoint (``.pt``) with seeded random weights, for offline tests.

The format is what ``whisper.load_model`` reads from a path: a torch file holding ``dims`` (the
``whisper.model.ModelDimensions`` fields, as a dict) and ``model_state_dict`` (fp16, as the
official checkpoints are). The state dict comes from openai-whisper's own ``Whisper`` module, so
its keys and shapes are the package's. ``TINY_DIMS`` keeps what the format fixes (80 mel bins,
1500 audio positions for a 30 s window, 448 text positions, the English-only GPT-2 vocabulary of
51864 ids) and shrinks widths and depths: about 7 MB, written in a second.

A decoder with purely random weights babbles up to its 224-token limit at each of whisper's six
fallback temperatures (minutes on a CPU, for text that cannot be checked). So the decoder is made
to say one word and stop, whatever the audio, and confidently (an unsure first pass would send
whisper on to its sampled fallbacks): its blocks write nothing to the residual stream, and text
positions 0, 1 and 2 carry large orthogonal directions that the embeddings of ``<|0.00|>`` (a
segment opens with a timestamp), the word and end-of-text point along. Everything else, the audio
encoder included, stays random and still runs.

Needs the optional ``openai-whisper`` package (imported on call).
"""

from __future__ import annotations

from pathlib import Path

import torch

ENGLISH_VOCAB = 51864  # n_vocab of the *.en models: below 51865, so the English-only tokenizer

TINY_DIMS: dict[str, int] = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 64,
    "n_audio_head": 2,
    "n_audio_layer": 1,
    "n_vocab": ENGLISH_VOCAB,
    "n_text_ctx": 448,
    "n_text_state": 64,
    "n_text_head": 2,
    "n_text_layer": 1,
}


SPOKEN_WORD = " hello"  # one GPT-2 token; the checkpoint's transcript of any audio is "hello"
POSITION_SCALE = 10.0  # norm of the directions at text positions 0..2 (other embeddings: ~0.2)
LOGIT_SCALE = 2.0  # norm of the word's and end-of-text's embeddings along those directions


def write_openai_whisper_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny openai-whisper checkpoint to ``path`` (a file) and return it."""
    from whisper.model import ModelDimensions, Whisper
    from whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(multilingual=False)
    (word_id,) = tokenizer.encode(SPOKEN_WORD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(ModelDimensions(**TINY_DIMS))
        decoder = model.decoder
        with torch.no_grad():
            for block in decoder.blocks:
                for out in (block.attn.out, block.mlp[2], *([block.cross_attn.out] if block.cross_attn else [])):
                    out.weight.zero_()
                    if out.bias is not None:
                        out.bias.zero_()
            decoder.token_embedding.weight.normal_(0.0, 0.02)
            decoder.positional_embedding.normal_(0.0, 0.02)  # the package leaves it uninitialised
            script = (tokenizer.timestamp_begin, word_id, tokenizer.eot)  # what positions 0, 1, 2 predict
            basis = torch.randn(TINY_DIMS["n_text_state"], len(script))
            basis -= basis.mean(dim=0)  # zero-mean, so the decoder's final LayerNorm keeps the direction
            directions = torch.linalg.qr(basis)[0].T  # orthonormal, zero-mean rows
            for position, token in enumerate(script):
                decoder.positional_embedding[position] = POSITION_SCALE * directions[position]
                decoder.token_embedding.weight[token] = LOGIT_SCALE * directions[position]
    state = {name: tensor.half() for name, tensor in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dict(TINY_DIMS), "model_state_dict": state}, path)
    return path
