"""Strict checkpoint loading shared by the vocoder's modules (flow.pt, hift.pt)."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from errors import ModelLoadError

StateDict = Mapping[str, torch.Tensor]


def _preview(keys: list[str]) -> str:
    return f"{keys[:8]}{'…' if len(keys) > 8 else ''}"


def load_strict(
    module: nn.Module,
    state_dict: StateDict | Path,
    name: str,
    convert: Callable[[StateDict], StateDict] | None = None,
) -> None:
    """Load ``state_dict`` (or the ``torch.load``-able file) into ``module`` with no missing,
    unexpected or mis-shaped key; any mismatch is a ModelLoadError naming ``name`` and the keys,
    raised before a single weight is copied.
    """
    if isinstance(state_dict, Path):
        try:
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelLoadError(f"cannot read {name} weights {state_dict}: {exc}") from exc
    if not isinstance(state_dict, Mapping):
        raise ModelLoadError(f"{name} weights must be a state dict, got {type(state_dict).__name__}")
    if convert is not None:
        state_dict = convert(state_dict)
    ours = module.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise ModelLoadError(
            f"{name} does not match the yaml's model: missing keys {_preview(missing)}, "
            f"unexpected keys {_preview(unexpected)}"
        )
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ModelLoadError(f"{name} shapes do not match the yaml's model: {wrong[:8]}")
    module.load_state_dict(state_dict, strict=True)
