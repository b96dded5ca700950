"""The GPU check (``bench.gpu_check``): its no-CUDA answer, its whole flow on CPU, and its failure exit.

The flow runs for real, as a subprocess (the command an operator types): the tiny bundle with
its AWQ and bnb variants, three real servers on loopback, every mode whole and streamed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import (
    CONCURRENT_CLIENTS,
    EDITS,
    NO_CUDA_MESSAGE,
    RequestResult,
    VariantReport,
    target_verdicts,
)
from bundles import bundle_is_complete, write_bundle
from bundles.llm_bundle import EOS_TOKEN_ID, llm_config_dict, random_llm_weights
from model_files import AWQ_DIR

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENS = 25  # the check's tiny default: five groups of 5 codes, 0.6 s of audio
TINY_AUDIO_S = 0.6


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_gpu_check_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    """The documented command itself, with this interpreter's venv (no install step)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            "make",
            "-s",
            "gpu-check",
            f"BIN={Path(sys.executable).parent}",
            "STAMP=",  # no venv install step: this interpreter's environment is the one under test
            f"ARGS=--root {tmp_path / 'root'} --out {out}",
        ],
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no CUDA, even on a GPU runner
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert NO_CUDA_MESSAGE in done.stdout
    assert not out.exists() and not (tmp_path / "root").exists()  # nothing written, nothing loaded


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str], dict]:
    """The whole check on CPU on the tiny bundle, once for the module."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    done = run_check("--device", "cpu", "--size", "tiny", "--root", str(tmp / "root"), "--out", str(tmp / "r.json"))
    report = json.loads((tmp / "r.json").read_text()) if (tmp / "r.json").is_file() else {}
    return tmp / "root", done, report


@pytest.mark.slow
def test_cpu_flow_runs_every_variant_and_mode_through_the_server(
    cpu_run: tuple[Path, subprocess.CompletedProcess[str], dict],
) -> None:
    _, done, report = cpu_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 failure(s)" in done.stdout
    assert [v["variant"] for v in report["variants_report"]] == ["base", "awq", "bnb"]
    expected = {(mode, streamed) for mode in ["clone", *(e[0] for e in EDITS)] for streamed in (False, True)}
    for variant in report["variants_report"]:
        assert variant["failures"] == []
        assert variant["load_s"] > 0
        requests = variant["requests"]
        assert {(r["mode"], r["streamed"]) for r in requests if "x" not in r["mode"]} == expected
        assert sum(r["mode"] == f"clone x{CONCURRENT_CLIENTS}" for r in requests) == CONCURRENT_CLIENTS
        for r in requests:
            assert r["status"] == 200 and r["error"] is None
            # the bundle never emits EOS: every generation is exactly the cap, decoded to its length
            assert r["audio_tokens"] == (None if r["streamed"] else TINY_TOKENS)
            assert r["audio_s"] == pytest.approx(TINY_AUDIO_S)
            assert 0 < r["first_audio_s"] <= r["seconds"]
            assert r["rtf"] == pytest.approx(r["seconds"] / r["audio_s"])
        assert set(variant["decode_tokens_per_s"]) == {"1", "8"}
        assert all(v > 0 for v in variant["decode_tokens_per_s"].values())
        assert variant["serving"][f"tokens_per_s_{CONCURRENT_CLIENTS}_clients"] > 0
        assert variant["peak_gpu_memory_gb"] is None  # CPU: no GPU counters, none invented
    for variant in ("base", "awq", "bnb"):  # the table on stdout names every variant
        assert any(line.startswith(variant + " ") for line in done.stdout.splitlines())


@pytest.mark.slow
def test_a_variant_that_does_not_load_fails_the_check(
    cpu_run: tuple[Path, subprocess.CompletedProcess[str], dict], tmp_path: Path
) -> None:
    root, _, _ = cpu_run
    broken = tmp_path / "root"
    shutil.copytree(root / "bundle", broken / "bundle")  # the finished bundle, markers included
    for weights in (broken / "bundle" / AWQ_DIR).glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    done = run_check("--device", "cpu", "--size", "tiny", "--variants", "awq", "--root", str(broken))
    assert done.returncode == 1
    assert "awq: did not load" in done.stdout
    assert "1 failure(s)" in done.stdout


def test_targets_are_judged_on_the_base_variant() -> None:
    base = VariantReport("base", decode_tokens_per_s={1: 180.0, 8: 900.0})
    base.requests = [
        RequestResult("clone", False, 200, seconds=5.0, first_audio_s=5.0, audio_s=10.0),  # RTF 0.5
        RequestResult("clone", True, 200, seconds=5.2, first_audio_s=0.25, audio_s=10.0),
    ]
    awq = VariantReport("awq", decode_tokens_per_s={1: 10.0})  # a slow variant does not decide
    verdicts = target_verdicts([awq, base])
    assert {name: v["met"] for name, v in verdicts.items()} == {
        "decode_tokens_per_s_batch1": True,
        "rtf_clone": False,
        "first_audio_s": True,
    }
    assert verdicts["rtf_clone"]["value"] == 0.5
    assert target_verdicts([awq]) == {}


# --- the check's bundle -----------------------------------------------------------------------------


def test_eos_free_weights_differ_only_in_the_eos_row() -> None:
    config = llm_config_dict("tiny")
    usual, endless = random_llm_weights(config, seed=3), random_llm_weights(config, seed=3, eos=False)
    assert usual.keys() == endless.keys()
    for key in usual:
        if key != "lm_head.weight":
            assert torch.equal(usual[key], endless[key]), key
    head, endless_head = usual["lm_head.weight"], endless["lm_head.weight"]
    assert head[EOS_TOKEN_ID].abs().sum() > 0 and endless_head[EOS_TOKEN_ID].abs().sum() == 0
    rows = torch.arange(head.shape[0]) != EOS_TOKEN_ID
    assert torch.equal(head[rows], endless_head[rows])


def test_variants_are_added_to_a_finished_bundle_without_rewriting_it(tmp_path: Path) -> None:
    root = write_bundle(tmp_path, size="tiny", seed=0, eos=False)
    assert bundle_is_complete(root, "tiny", 0, eos=False) and not bundle_is_complete(root, "tiny", 0)
    weights = next((root / "Step-Audio-EditX").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    write_bundle(root, size="tiny", seed=0, eos=False, variants=("awq",))
    assert weights.stat().st_mtime_ns == written
    awq = next((root / AWQ_DIR).glob("*.safetensors"))
    awq_written = awq.stat().st_mtime_ns
    write_bundle(root, size="tiny", seed=0, eos=False, variants=("awq",))  # everything reused
    assert awq.stat().st_mtime_ns == awq_written
    with pytest.raises(ValueError, match="quantised variants"):
        write_bundle(root, size="tiny", variants=("gptq",))


def test_decode_rate_is_measured_on_the_servers_own_decode_loop(tiny_bundle: Path, tmp_path: Path) -> None:
    """The check times the scheduler a running server's requests go through: its steps land in that
    server's own batch-size metrics, with all 8 requests in one step."""
    from bench.gpu_check import decode_tokens_per_s
    from tests.api_live import LiveServer, test_settings

    settings = test_settings(tiny_bundle, tmp_path / "cache", enable_auto_transcribe=False, ui=False)
    with LiveServer(settings) as live:
        state = live.app.state.step_audio

        def batch_of_8_steps() -> float:
            def bucket(le: str) -> float:
                labels = {"variant": "base", "le": le}
                return state.metrics.registry.get_sample_value("step_audio_llm_batch_size_bucket", labels) or 0.0

            return bucket("8.0") - bucket("6.0")

        scheduler = state.engine.synthesizer.schedulers["base"]
        steps_before, full_before = scheduler.steps, batch_of_8_steps()
        rate = decode_tokens_per_s(scheduler, 8, 6)
        full_after = batch_of_8_steps()
    assert rate > 0
    assert scheduler.steps - steps_before >= 6  # the server's loop ran the measured steps
    assert full_after - full_before >= 4  # and its metrics saw every request of the batch in one step
