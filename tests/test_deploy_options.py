"""What every entry point of the replicated deployment hands Serve, without a cluster."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")

from deploy.options import AppArgs, ReplicaOptions
from deploy.ray_serve import deployment_options, parse, speech_app, ui_app, ui_args


def test_serve_lets_through_more_than_the_app_admits() -> None:
    """Serve queues only beyond the app's own queue, so a full replica answers with the app's 429."""
    args = AppArgs(server={"inference_workers": 3, "queue_size": 5})
    options = deployment_options(args, "StepAudio")
    assert options["max_ongoing_requests"] > 3 + 5
    assert options["backpressure_config"].status_code == 429 and options["backpressure_config"].retry_after_s == 2
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options


def test_autoscaling_targets_the_replicas_own_workers() -> None:
    args = AppArgs(server={"inference_workers": 6}, replica=ReplicaOptions(min_replicas=1, max_replicas=4, num_gpus=1))
    options = deployment_options(args, "StepAudio")
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["target_ongoing_requests"] == 6
    assert (options["autoscaling_config"]["min_replicas"], options["autoscaling_config"]["max_replicas"]) == (1, 4)
    assert options["ray_actor_options"]["num_gpus"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"server": {"api_key": "secret"}},  # secrets come from the environment
        {"server": {"modle_path": "/m"}},  # Settings would ignore a typo
        {"replica": {"min_replicas": 1}},  # min without max
        {"replica": {"min_replicas": 3, "max_replicas": 2}},
        {"replica": {"replica_cache_dirs": True}},  # per-replica caches without a shared store for the voices
        {"replica": {"replicas": 2, "typo": 1}},
    ],
)
def test_bad_args_are_refused_before_ray_sees_them(bad: dict) -> None:
    with pytest.raises(ValueError):
        AppArgs.model_validate(bad)


def test_the_web_ui_runs_on_exactly_one_replica() -> None:
    """Gradio's two-step calls must reach one process: the UI application never scales out."""
    args = AppArgs(replica=ReplicaOptions(min_replicas=2, max_replicas=8))
    assert ui_args(args).replica.replicas == 1 and not ui_args(args).replica.autoscaling
    assert ui_args(args).replica.metrics_port == args.replica.metrics_port + 100  # beside the speech replicas'
    ui = ui_app(args.model_dump(mode="json"))._bound_deployment
    assert ui.num_replicas == 1 and ui._deployment_config.autoscaling_config is None
    speech = speech_app(args.model_dump(mode="json"))._bound_deployment  # the check can fail: this one scales
    assert speech._deployment_config.autoscaling_config is not None


def test_the_command_keeps_secrets_out_of_the_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEP_AUDIO_API_KEY", raising=False)
    ns, args, settings = parse(["--min-replicas", "1", "--max-replicas", "3", "--", "--demo", "--api-key", "k3y"])
    assert settings.api_key is not None and "api_key" not in args.server
    assert args.server["demo"] is True and args.replica.autoscaling and args.ui_route == "/ui"
    assert not ns.print_config
    _, no_ui, _ = parse(["--", "--no-ui"])
    assert no_ui.ui_route is None
