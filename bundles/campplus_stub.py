"""A seeded stand-in for ``campplus.onnx`` with CAM++'s input/output signature.

The real CAM++ speaker model (28 MB) is not redistributable here; tiny and full-size bundles
ship this small network instead: per-frame MLP, mean and max pooling over time, a linear
projection to 192 floats. Input ``input`` float32 [1, T, 80] (T dynamic), output ``output``
float32 [1, 192], the names the real file uses. The embedding means nothing acoustically;
it only lets every line of the real frontend and flow code run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

FBANK_BINS = 80  # CAM++ input: 80-bin Kaldi fbank frames
EMBED_DIM = 192  # CAM++ output: speaker embedding size
HIDDEN = 64  # width of the stand-in's frame MLP
OPSET = 17
EXAMPLE_FRAMES = 50  # frames of the example input used for tracing (T stays dynamic)


class CampplusStub(nn.Module):
    """(1, T, 80) fbank -> (1, 192): frame MLP, [mean ‖ max] pooling over time, projection."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.frame = nn.Linear(FBANK_BINS, hidden)
        self.proj = nn.Linear(2 * hidden, EMBED_DIM)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats : (1, T, 80) -> (1, 192)."""
        h = torch.relu(self.frame(feats))
        pooled = torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=-1)
        return self.proj(pooled)


def write_campplus_onnx(path: Path | str, seed: int = 0) -> Path:
    """Export a seeded :class:`CampplusStub` to ``path`` (ONNX, opset 17); same seed, same file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model = CampplusStub()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.eval()
    example = torch.randn(1, EXAMPLE_FRAMES, FBANK_BINS, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {1: "T"}},
            opset_version=OPSET,
            dynamo=False,
        )
    logger.debug("wrote CAM++ stand-in %s (seed %d)", path, seed)
    return path
