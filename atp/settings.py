"""Settings, from the environment with the ``ATP_`` prefix (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of the core. ``ATP_REDIS_URL`` unset means: use the embedded server."""

    model_config = SettingsConfigDict(env_prefix="ATP_", extra="ignore")

    redis_url: str | None = Field(default=None, description="redis:// or unix:// URL")
    key_prefix: str = Field(default="atp:", max_length=32, pattern=r"^[A-Za-z0-9_.:\-]*$")
    buckets: int = Field(default=128, ge=1, le=16384, description="fixed per deployment")

    max_line_qty: int = Field(default=1_000_000, ge=1, le=10**9)
    max_on_hand: int = Field(default=10**12, ge=1, le=10**13)
    max_lines: int = Field(default=100, ge=1, le=1000)
    default_hold_seconds: int = Field(
        default=0, ge=0, description="hold for a reserve that names none; 0 = confirm at once"
    )
    max_hold_seconds: int = Field(default=7 * 86400, ge=1)

    autopipeline: bool = Field(
        default=True, description="send script calls of one event-loop turn as one pipeline"
    )
    autopipeline_max_batch: int = Field(default=16, ge=1, le=1024)
    reclaim_batch: int = Field(default=50, ge=1, le=10_000, description="per position, per call")
    expire_batch: int = Field(default=200, ge=1, le=10_000, description="per bucket, per call")
    log_maxlen: int = Field(default=100_000, ge=100, description="movements kept per position")
    events_maxlen: int = Field(default=1_000_000, ge=100, description="events kept per bucket")

    data_dir: Path = Field(default=Path(".atp-data"), description="embedded server data")
    appendfsync: Literal["always", "everysec", "no"] = "always"
    embedded_allocator: Literal["auto", "jemalloc", "libc"] = Field(
        default="auto",
        description="the embedded server's allocator: auto preloads the system's jemalloc "
        "into a libc-malloc build when there is one (atp.embedded)",
    )

    env: Literal["development", "production"] = "development"
    admin_key: SecretStr | None = Field(default=None, description="bootstrap admin bearer key")
    key_refresh_seconds: float = Field(default=1.0, gt=0, le=60)
    reaper_interval: float = Field(
        default=1.0,
        ge=0,
        description="seconds between hold reaps by `atp worker` (and by the API app itself "
        "when it runs without a worker: `atp serve --no-worker`, or served otherwise); 0 = off",
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    count_skew_seconds: int = Field(
        default=300, ge=0, le=86_400, description="how far in the future a count may be dated"
    )
    worker_chunk: int = Field(
        default=2000, ge=1, le=10_000, description="count rows a worker applies per script call"
    )
    worker_claim_idle_seconds: float = Field(
        default=30.0,
        ge=0,
        description="a batch pending this long with no progress from its worker is claimed "
        "by another (its worker is taken for dead)",
    )
    counts_max_rows: int = Field(default=100_000, ge=1, le=10_000_000, description="per batch")
    counts_retention_seconds: int = Field(
        default=7 * 86400, ge=60, description="finished count batches (rows, result) kept"
    )

    @model_validator(mode="after")
    def _no_weak_secrets(self) -> Settings:
        key = self.admin_key.get_secret_value() if self.admin_key else None
        if key is not None and self.env == "production":
            weak = len(key) < 24 or len(set(key)) < 8 or key.lower() in _WEAK
            if weak:
                raise ValueError(
                    "ATP_ADMIN_KEY is too weak for production: use at least 24 random "
                    "characters, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return self


_WEAK = {"changeme", "admin", "password", "secret", "demo", "test"}
