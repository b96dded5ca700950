"""Replicas on Ray Serve: throughput and latency with 1 and 2 replicas against the same load.

    .venv/bin/python -m bench.bench_replicas [--requests 24] [--clients 4] [--seconds 3]
        [--workers 2] [--root DIR] [--port 18471]

Not a test. A local Ray cluster (``deploy.ray_serve.LocalCluster``, what ``python -m
deploy.ray_serve`` starts) on this host serves the tiny bundle (its LLM never stops before its
cap, so every request generates exactly ``--seconds`` of audio) through Serve's proxy: first on
one replica, then on two (the same deployment scaled out), each a full app with its own engine
and ``--workers`` inference workers. The same ``--requests`` clone requests (the default voice,
distinct seeds) are sent by ``--clients`` concurrent clients, whole answers in pcm.

Per run: throughput = audio seconds delivered / wall seconds, and requests/s; latency = request
to last byte (p50, p99). On a machine with few cores the replicas share the same cores, so this
is a functional check of the deployment (requests spread, nothing lost, the proxy's cost), not a
measure of scaling: each replica belongs on its own GPU. Prints a table and writes
``bench/out/replicas.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import httpx

from api.loopback import LOOPBACK
from bench.bench_streaming import max_ids_for, run_clients, timed_request
from bench.replica_app import CAP_ENV
from bundles import write_bundle
from deploy.options import AppArgs, ReplicaOptions
from deploy.ray_serve import LocalCluster

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"


def _run(url: str, bodies: list[dict], clients: int) -> dict[str, float]:
    row = run_clients(url, bodies, clients)
    replicas: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as c:  # which replicas answer now
        for _ in range(8):
            tag = c.get("/readyz").headers["x-step-audio-replica"]
            replicas[tag] = replicas.get(tag, 0) + 1
    return {**row, "replicas_answering": float(len(replicas))}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per request")
    parser.add_argument("--workers", type=int, default=2, help="inference workers per replica")
    parser.add_argument("--root", type=Path, default=OUT_DIR / "bundles")
    parser.add_argument("--port", type=int, default=18471, help="Serve's proxy, on 127.0.0.1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in {
        CAP_ENV: str(max_ids_for(args.seconds)),
        "RAY_AUTH_MODE": "disabled",  # a loopback cluster for the length of this run
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }.items():
        os.environ[name] = value
    bundle = write_bundle(args.root / "tiny-no-eos", size="tiny", seed=0, eos=False)
    cluster_args = AppArgs(
        server={
            "model_path": str(bundle),
            "cache_dir": tempfile.mkdtemp(prefix="bench-replicas-"),
            "device": "cpu",
            "api_host": LOOPBACK,
            "inference_workers": args.workers,
            "queue_size": args.requests,
            "ui": False,
        },
        replica=ReplicaOptions(replicas=1, num_cpus=0.5, metrics_port=0, app_factory="bench.replica_app:create_app"),
        ui_route=None,
    )

    def body(seed: int) -> dict:
        step = {"seed": seed}
        return {"input": "A replicated sentence.", "voice": "alloy", "response_format": "pcm", "step_audio": step}

    rows = []
    cpus = os.cpu_count() or 2
    with LocalCluster(cluster_args, host=LOOPBACK, port=args.port, num_cpus=cpus, num_gpus=0) as cluster:
        for replicas in (1, 2):
            if replicas > 1:  # the same deployment scaled out (its replica keeps serving meanwhile)
                scaled = cluster_args.model_copy(
                    update={"replica": cluster_args.replica.model_copy(update={"replicas": replicas})}
                )
                cluster.deploy(scaled)
            with httpx.Client(base_url=cluster.url, timeout=3600) as c:
                for seed in range(2 * replicas):  # warm-up: every replica's prompt cache and lazy inits
                    timed_request(c, body(seed))
            row = _run(cluster.url, [body(100 + i) for i in range(args.requests)], args.clients)
            rows.append({"replicas": float(replicas), **row})
            logger.warning("%d replica(s): %s", replicas, row)
    print(
        f"\ntiny bundle on CPU ({cpus} cores), {args.requests} requests of {args.seconds:g} s audio, "
        f"{args.clients} clients, {args.workers} inference workers per replica, through Serve's proxy"
    )
    print(f"{'replicas':>8} {'audio s/s':>10} {'req/s':>7} {'x one':>6} {'p50 s':>7} {'p99 s':>7} {'answering':>10}")
    for r in rows:
        gain = r["throughput"] / rows[0]["throughput"]
        print(
            f"{int(r['replicas']):>8} {r['throughput']:>10.2f} {r['requests_per_s']:>7.2f} {gain:>6.2f} "
            f"{r['latency_p50_s']:>7.2f} {r['latency_p99_s']:>7.2f} {int(r['replicas_answering']):>10}"
        )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    report = {"cores": cpus, "requests": args.requests, "clients": args.clients, "seconds": args.seconds, "rows": rows}
    (OUT_DIR / "replicas.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
