"""What a replicated deployment is configured with, checked before Ray sees it.

One model for every entry point: the ``args`` of an application in a Serve config file (and so
in KubeRay's ``serveConfigV2``), what ``python -m deploy.ray_serve`` builds from its flags, and
what each replica receives. Server settings travel as ``server`` (``Settings`` field names, the
flags of ``api_server.py``); secrets never do: the API key and the store's credentials reach the
replicas through their environment (a Kubernetes Secret, or the driver's own environment on a
local cluster), because Serve keeps application args in its config, visible to anyone who can
read the cluster's state.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from settings import Settings

SECRET_FIELDS = frozenset({"api_key"})
HEADROOM_REQUESTS = 16  # requests a replica takes beside its queued jobs: health, listings, the UI's polling


class ReplicaOptions(BaseModel):
    """One Serve deployment of the app: how many replicas, their resources, their limits."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0, description="Fixed replica count (when min/max are not given).")
    min_replicas: int | None = Field(None, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Autoscaling target per replica (default: the server's --inference-workers)."
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica: 1 on GPU nodes (one replica per GPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (Ray's scheduling, not a limit).")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests Serve holds while no replica has room; beyond, 429 (-1: no bound)."
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After of Serve's own 429.")
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Each replica's side port (metrics, /healthz, /readyz): this + its local rank; 0: none.",
    )
    replica_cache_dirs: bool = Field(
        False,
        description="Each replica keeps its local cache level in <cache-dir>/replica-<rank>, as on separate hosts "
        "(needs --store-url: voices must be shared).",
    )
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0, description="How long a stopping replica's streams get.")
    app_factory: str = Field(
        "api.app:create_app", description="module:function building the app from Settings (tests add a route)."
    )

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> ReplicaOptions:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give min_replicas and max_replicas together")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None


class AppArgs(BaseModel):
    """The ``args`` of one Serve application (the speech API at ``/``, or the web UI at ``/ui``)."""

    model_config = ConfigDict(extra="forbid")

    server: dict[str, Any] = Field(default_factory=dict, description="api_server.py's settings by field name.")
    replica: ReplicaOptions = Field(default_factory=ReplicaOptions)
    ui_route: str | None = Field(
        "/ui", description="Where the web UI application is served (the speech API redirects / there); None: no UI."
    )

    @field_validator("server")
    @classmethod
    def _known_settings_no_secrets(cls, server: dict[str, Any]) -> dict[str, Any]:
        unknown = set(server) - set(Settings.model_fields)
        if unknown:  # Settings ignores unknown names (environment variables): a typo here must not
            raise ValueError(f"unknown server settings: {', '.join(sorted(unknown))} (api_server.py's, snake_case)")
        secret = SECRET_FIELDS & set(server)
        if secret:
            raise ValueError(f"{', '.join(sorted(secret))} comes from the environment (STEP_AUDIO_API_KEY), not args")
        return server

    @model_validator(mode="after")
    def _shared_voices(self) -> AppArgs:
        settings = self.settings()
        if self.replica.replica_cache_dirs and not settings.store_url:
            raise ValueError("replica_cache_dirs needs the server's store_url: each replica would see other voices")
        return self

    def settings(self) -> Settings:
        """The server settings (args, then STEP_AUDIO_* from this process's environment, then defaults)."""
        return Settings(**self.server)

    def max_ongoing_requests(self) -> int:
        """Serve's per-replica bound, above what the app itself admits.

        The app queues ``--inference-workers`` + ``--queue-size`` jobs and answers the next one 429
        with Retry-After (its own admission control); Serve must let that many through, plus the
        requests that take no job (health, listings, the UI's polling), or Serve would queue
        them first and the app's 429 would never be seen.
        """
        settings = self.settings()
        return settings.inference_workers + settings.queue_size + HEADROOM_REQUESTS
