"""Shared test fixtures: where the reference fixtures live, and skipping cleanly without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE_DIR = SHARED_DATA / "reference-fixtures"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference-fixture set made by the upstream code; skip where a clone has no ../shared."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip("../shared/data/reference-fixtures is absent (only development machines have it)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def step1_tokenizer_dir() -> Path:
    """The real public Step1 tokenizer files; skip where absent."""
    d = SHARED_DATA / "step1-tokenizer"
    if not (d / "tokenizer.model").is_file():
        pytest.skip("../shared/data/step1-tokenizer is absent")
    return d


def load_reference(reference_dir: Path, rel: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``rel`` like ``wav2token/a``: the JSON metadata and the npz arrays of one fixture case."""
    meta = json.loads((reference_dir / f"{rel}.json").read_text())
    npz = reference_dir / f"{rel}.npz"
    arrays = dict(np.load(npz)) if npz.is_file() else {}
    return meta, arrays
