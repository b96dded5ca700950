"""The mixed audio-code grid shared by the tokenizer, the LLM and the vocoder: defined here once.

Speech is cut into groups of 120 ms. Each group holds 2 vq02 codes (16.67 Hz, 1024 entries) and
3 vq06 codes (25 Hz, 4096 entries), interleaved as ``a b c d e`` = vq02, vq02, vq06, vq06, vq06.
A *mixed code* puts both codebooks in one range: vq02 as is, vq06 offset by the vq02 size, so
0..5119. The LLM spells mixed code ``n`` as the token ``<audio_n>``, id ``65536 + n``. The vocoder
turns one group into 3 dual-codebook frames (25 Hz).
"""

from __future__ import annotations

VQ02_CODES = 1024  # vq02 codebook entries; also the offset of vq06 within the mixed codes
VQ06_CODES = 4096
N_MIXED_CODES = VQ02_CODES + VQ06_CODES  # 5120
VQ02_PER_GROUP = 2
VQ06_PER_GROUP = 3
CODES_PER_GROUP = VQ02_PER_GROUP + VQ06_PER_GROUP  # 5
FRAMES_PER_GROUP = 3  # dual-codebook (25 Hz) frames per group
GROUP_SECONDS = 0.12
AUDIO_ID_OFFSET = 65536  # LLM id of <audio_0>
