"""Run the speech server as Ray Serve replicas: one command for a local cluster, builders for the rest.

    python -m deploy.ray_serve --replicas 2 -- --demo --api-port 8003
    python -m deploy.ray_serve --min-replicas 1 --max-replicas 4 --num-gpus 1 -- \\
        --model-path /models --store-url s3://bucket/step-audio
    serve run deploy/serve_config.yaml          # the same applications from a Serve config file
    kubectl apply -f deploy/kuberay/rayservice.yaml   # KubeRay (docs/scale-out.md)

Flags after ``--`` are ``api_server.py``'s; ``--api-host`` / ``--api-port`` become Serve's proxy.
Two Serve applications: ``speech`` at ``/`` (the API, its replicas autoscaled or fixed) and
``ui`` at ``/ui`` (the web UI on one replica of its own: Gradio's calls come in two requests
that must reach the same process, which random routing across replicas would break).

The builders ``speech_app`` and ``ui_app`` take a Serve config file's ``args``
(``deploy.options.AppArgs``); ``deployment_options`` is where Serve's knobs are set from them,
so every entry point deploys the same thing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from api.logs import LOG_FORMAT
from deploy.options import SECRET_FIELDS, AppArgs, ReplicaOptions
from deploy.replica import StepAudioReplica
from settings import Settings

logger = logging.getLogger("deploy.ray_serve")

SPEECH_APP, UI_APP = "speech", "ui"
UI_ROUTE = "/ui"
UI_METRICS_OFFSET = 100  # the UI replica's side port: the speech replicas' base + 100
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # requests and responses pass through it only when large


def deployment_options(args: AppArgs, name: str) -> dict[str, Any]:
    """Serve's options for one deployment of the app.

    Queueing: a replica takes up to ``AppArgs.max_ongoing_requests`` requests, more than the app
    itself admits, so a full replica answers with the app's own 429 (JSON, Retry-After) rather
    than Serve holding the request. Serve queues only while no replica can take one (all busy
    past that bound, or none running yet), up to ``max_queued_requests``; beyond that Serve
    answers 429 itself (``backpressure_config``, plain text with Retry-After).
    """
    replica = args.replica
    settings = args.settings()
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": args.max_ongoing_requests(),
        "max_queued_requests": replica.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=replica.retry_after_s),
        "ray_actor_options": {"num_gpus": replica.num_gpus, "num_cpus": replica.num_cpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": replica.graceful_shutdown_timeout_s,
    }
    if replica.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": replica.min_replicas,
            "max_replicas": replica.max_replicas,
            "initial_replicas": max(replica.min_replicas or 0, min(replica.replicas, replica.max_replicas or 1)),
            # one replica's inference workers busy is "full": more than that on average scales up
            "target_ongoing_requests": replica.target_ongoing_requests or settings.inference_workers,
            "upscale_delay_s": replica.upscale_delay_s,
            "downscale_delay_s": replica.downscale_delay_s,
        }
    else:
        options["num_replicas"] = replica.replicas
    return options


def speech_app(args: dict[str, Any]) -> Application:
    """The API at ``/`` (a Serve application builder: ``import_path: deploy.ray_serve:speech_app``)."""
    checked = AppArgs.model_validate(args)
    checked = checked.model_copy(update={"server": {**checked.server, "ui": False}})
    return _bind(checked, "StepAudio")


def ui_app(args: dict[str, Any]) -> Application:
    """The web UI at ``/ui`` on exactly one replica with its own engine (docs/scale-out.md)."""
    checked = AppArgs.model_validate(args)
    checked = checked.model_copy(
        update={"server": {**checked.server, "ui": True}, "replica": _one_replica(checked.replica)}
    )
    return _bind(checked, "WebUI")


def _bind(args: AppArgs, name: str) -> Application:
    deployment: Any = StepAudioReplica  # serve.deployment made it a Deployment, which mypy cannot see
    application: Application = deployment.options(**deployment_options(args, name)).bind(args.model_dump(mode="json"))
    return application


def ui_args(args: AppArgs) -> AppArgs:
    """The UI application's args from the speech application's: one replica, its own side port."""
    port = args.replica.metrics_port + UI_METRICS_OFFSET if args.replica.metrics_port else 0
    return args.model_copy(update={"replica": _one_replica(args.replica, metrics_port=port)})


def _one_replica(replica: ReplicaOptions, **update: Any) -> ReplicaOptions:
    """``replica`` fixed at one, never autoscaled: Gradio keeps a session in the process that served
    its page, and Serve has no affinity to send the next request there (docs/scale-out.md)."""
    return replica.model_copy(update={"replicas": 1, "min_replicas": None, "max_replicas": None, **update})


def serve_config(args: AppArgs, *, host: str, port: int) -> dict[str, Any]:
    """A Serve config file (``serve run`` / ``serve deploy``, KubeRay's ``serveConfigV2``) for ``args``."""
    apps = [(SPEECH_APP, "/", "speech_app", args)]
    if args.ui_route:
        apps.append((UI_APP, args.ui_route, "ui_app", ui_args(args)))
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": route,
                "import_path": f"deploy.ray_serve:{builder}",
                "args": app_args.model_dump(mode="json", exclude_defaults=True),
            }
            for name, route, builder, app_args in apps
        ],
    }


# --------------------------------------------------------------------------- a local cluster


@dataclass
class LocalCluster:
    """Ray on this host, Serve's proxy on ``host:port``, and the applications of ``args``.

    ``with LocalCluster(args, ...) as cluster: cluster.url`` (every application RUNNING: every
    replica loaded). ``address`` joins a running cluster instead (``auto``: the one ``ray start``
    made); otherwise Ray starts here with ``num_cpus`` / ``num_gpus`` (None: what the host has),
    its node on loopback, and stops with the block.
    """

    args: AppArgs
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    temp_dir: str | None = None
    _made_temp_dir: str | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    def __enter__(self) -> LocalCluster:
        import ray

        begin = time.perf_counter()
        if self.address is None:
            # a cluster of this host alone: Ray's node on 127.0.0.1, nothing on other interfaces
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                address="local",
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                # Unix sockets live under it: a long path passes their 107-byte limit
                _temp_dir=self.temp_dir or self._make_temp_dir(),
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=self.address, logging_level=logging.WARNING)
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            self.deploy(self.args)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        logger.info("serving on %s in %.1f s", self.url, time.perf_counter() - begin)
        return self

    def deploy(self, args: AppArgs) -> None:
        """Deploy (or redeploy: Serve replaces the replicas one by one) the applications of ``args``."""
        self.args = args
        raw = args.model_dump(mode="json")
        serve.run(speech_app(raw), name=SPEECH_APP, route_prefix="/")
        if args.ui_route:
            serve.run(ui_app(ui_args(args).model_dump(mode="json")), name=UI_APP, route_prefix=args.ui_route)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        import ray

        try:
            serve.shutdown()
        finally:
            if self.address is None:
                ray.shutdown()
            if self._made_temp_dir is not None:  # the session's logs and sockets, made for this cluster
                shutil.rmtree(self._made_temp_dir, ignore_errors=True)
                self._made_temp_dir = None

    def _make_temp_dir(self) -> str:
        self._made_temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        return self._made_temp_dir


# --------------------------------------------------------------------------- the command


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, AppArgs, Settings]:
    own, server_flags = _split(list(argv))
    parser = argparse.ArgumentParser(
        prog="python -m deploy.ray_serve",
        description="Serve the speech server as Ray Serve replicas. Flags after -- are api_server.py's.",
    )
    parser.add_argument("--replicas", type=int, default=1, help="fixed replica count (default 1)")
    parser.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (with --max-replicas)")
    parser.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica: 1 on GPU hosts")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--metrics-port", type=int, default=9100, help="side port base per replica (0: none)")
    parser.add_argument("--replica-cache-dirs", action="store_true", help="a local cache directory per replica")
    parser.add_argument("--no-ui-app", action="store_true", help="no web UI application at /ui")
    parser.add_argument("--address", help="join a running Ray cluster (auto: ray start's) instead of starting one")
    parser.add_argument("--print-config", action="store_true", help="print the Serve config file and exit")
    ns = parser.parse_args(own)
    settings = Settings.from_cli(server_flags)
    given = settings.model_fields_set - SECRET_FIELDS
    server = settings.model_dump(mode="json", include=given)
    server.pop("ui", None)
    replica = ReplicaOptions(
        replicas=ns.replicas,
        min_replicas=ns.min_replicas,
        max_replicas=ns.max_replicas,
        num_gpus=ns.num_gpus,
        num_cpus=ns.num_cpus,
        metrics_port=ns.metrics_port,
        replica_cache_dirs=ns.replica_cache_dirs,
    )
    ui_route = None if ns.no_ui_app or not settings.ui else UI_ROUTE
    return ns, AppArgs(server=server, replica=replica, ui_route=ui_route), settings


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    ns, args, settings = parse(sys.argv[1:] if argv is None else argv)
    if ns.print_config:
        yaml.safe_dump(serve_config(args, host=settings.api_host, port=settings.api_port), sys.stdout, sort_keys=False)
        return 0
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    if settings.api_key is not None:  # replicas read it from the environment they inherit, never from args
        os.environ.setdefault("STEP_AUDIO_API_KEY", settings.api_key.get_secret_value())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCluster(args, host=settings.api_host, port=settings.api_port, address=ns.address) as cluster:
        ui = f"; web UI: {cluster.url}{args.ui_route}/" if args.ui_route else ""
        logger.info("the speech API is on %s%s (Ctrl-C stops the cluster)", cluster.url, ui)
        stop.wait()
        logger.info("stopping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
