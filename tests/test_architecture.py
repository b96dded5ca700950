"""The import layers of the top-level modules, which import-linter cannot analyse (it takes packages).

``lint-imports`` (run by ``make test`` before pytest) checks the packages against the contracts in
pyproject.toml; this test ranks the top-level modules among them, so that no import goes up or
sideways anywhere. A module may import only modules of a lower rank.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = {
    "errors": 0,
    "audio_codes": 0,
    "model_files": 0,
    "fsutil": 0,
    "cache_keys": 0,
    "audio": 1,
    "cache_index": 1,
    "settings": 1,
    "object_store": 1,
    "token_cache": 2,
    "shared_cache": 3,
    "tokenizer": 3,
    "llm": 3,
    "vocoder": 3,
    "model_loader": 4,
    "engine": 5,
    "bundles": 5,
    "api": 6,
    "api_server": 7,
    "deploy": 7,
    "bench": 8,
    "tests": 9,
}
# Third-party clients only one place may import (the packages: the import-linter contract in pyproject.toml)
ONLY_IN = {
    "ray": {"deploy", "bench", "tests"},
    "boto3": {"object_store", "tests"},
    "botocore": {"object_store", "tests"},
}
TOP_LEVEL_MODULES = sorted(p.stem for p in REPO.glob("*.py"))


def all_imports(path: Path) -> set[str]:
    """The top-level names that ``path`` imports (TYPE_CHECKING and function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def project_imports(path: Path) -> set[str]:
    """The project's top-level names that ``path`` imports."""
    return all_imports(path) & set(RANKS)


def test_every_top_level_module_has_a_rank() -> None:
    assert set(TOP_LEVEL_MODULES) <= set(RANKS), set(TOP_LEVEL_MODULES) - set(RANKS)


def test_top_level_modules_import_only_lower_ranks() -> None:
    wrong = {
        f"{name} (rank {RANKS[name]}) imports {dep} (rank {RANKS[dep]})"
        for name in TOP_LEVEL_MODULES
        for dep in project_imports(REPO / f"{name}.py")
        if dep != name and RANKS[dep] >= RANKS[name]
    }
    assert not wrong, sorted(wrong)


def test_the_rank_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The check itself can fail: an upward import in a module's source is found."""
    module = tmp_path / "tokenizer.py"
    module.write_text("from engine.tts import StepAudioEngine\nimport audio\n", encoding="utf-8")
    assert project_imports(module) == {"engine", "audio"}


def test_ray_and_the_s3_client_are_imported_only_where_they_belong() -> None:
    """The single server never needs Ray or boto3: Ray only in deploy/ (and what runs it), boto3 only
    in object_store (lazily, for an s3:// store)."""
    wrong = sorted(
        f"{path.relative_to(REPO)} imports {client}"
        for path in REPO.rglob("*.py")
        if not {".venv", "cache", "models"} & set(path.relative_to(REPO).parts)
        for client in all_imports(path) & set(ONLY_IN)
        if (path.stem if path.parent == REPO else path.relative_to(REPO).parts[0]) not in ONLY_IN[client]
    )
    assert not wrong, wrong


def test_the_client_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "settings.py"
    module.write_text("def f():\n    import boto3\n    from ray import serve\n", encoding="utf-8")
    assert all_imports(module) == {"boto3", "ray"}
