"""Service settings, read from M2REC_* environment variables; built by create_app's caller, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.store.cluster_url import CLUSTER_SCHEMES, is_cluster_url, parse_cluster_url

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="M2REC_", extra="forbid", frozen=True)

    artifact_path: Path = Field(
        Path("artifacts"), description="an artifact version directory, or a root with a `current` pointer"
    )
    store_url: str = Field(
        "m2rec.sqlite3",
        description="redis://host:port/db (also rediss://, unix://) for Redis; "
        "redis+cluster://host:port[,host:port...] (also rediss+cluster://) for Redis Cluster; "
        "anything else is a SQLite file",
    )
    redis_namespace: str = Field(
        "default", pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Redis keys live under m2rec:{namespace}: (Redis Cluster: also m2rec:{namespace/i|u/<bucket>}:)"
    )
    api_key: SecretStr | None = Field(None, description="when set, writes need header X-API-Key")

    index_kind: Literal["auto", "exact"] = Field(
        "auto", description="FAISS index of each population (trained items, new items): auto = exact below "
        "index_ivf_min_rows, IVF-PQ4 (4-bit fast-scan codes, re-ranked from the rows) above; exact = exact at "
        "every size")
    index_nlist: int | None = Field(None, ge=1, description="IVF lists; None = about 2·sqrt(N), set at each training")
    index_nprobe: int = Field(16, ge=1, description="IVF lists scanned per query (recall vs latency: "
                              "benchmarks/results/serve.md)")
    index_ivf_min_rows: int = Field(50_000, ge=1, description="below this many rows a population stays exact")
    index_rerank: int = Field(10, ge=1, description="IVF-PQ4: rerank·k candidates by the codes re-scored from the rows")
    index_row_codes: Literal["float32", "float16", "sq8"] = Field(
        "float32", description="IVF-PQ4: the rows it re-ranks from, as float32 (exact), float16 (half the memory) or "
        "SQ8 codes (a quarter: a catalogue of 10M; scores within a code step)")
    index_snapshot_dir: Path | None = Field(
        None, description="save the index here at shutdown and start from it plus later events"
    )

    max_batch_size: int = Field(1000, ge=1, description="items or interactions per request")
    recommend_batch_max: int = Field(16, ge=1, le=19, description="concurrent /recommend requests answered by one "
                                     "fold-in and index search (1: each alone)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_history_length: int = Field(500, ge=1, description="most recent items kept per user and folded in")
    max_seen_items: int = Field(10_000, ge=1, description="most recent items kept per user in the seen set "
                                "(every item a user interacted with: the history plus what was pushed out of "
                                "it; Store.get_seen); never fewer than max_history_length (raised to it)")
    history_ttl_seconds: int | None = Field(
        180 * 86400, ge=1, description="Redis: a user's history and seen set expire this long after their last "
        "interaction (refreshed on every write), so idle users do not hold memory forever; None keeps them forever")
    k_max: int = Field(200, ge=1, description="largest k a client may ask /recommend for")
    event_poll_seconds: float = Field(
        0.2, gt=0.0, description="how often the event follower reads the store (bounds replica lag)"
    )

    artifact_poll_seconds: float | None = Field(
        None, gt=0.0, description="reload when the artifact root's `current` pointer moves, checked this often; "
        "None: reload only through POST /admin/reload")
    reload_batch_items: int = Field(1000, ge=1, description="stored items re-embedded per batch during a reload")
    reload_batch_pause_seconds: float = Field(
        0.0, ge=0.0, description="pause between re-embed batches, leaving the CPU to requests during a reload")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads (embedding new items) and NumPy BLAS "
                               "threads (fold-in); requests already run in parallel")
    faiss_threads: int = Field(1, ge=1, description="FAISS OpenMP threads per call: searches (requests already run "
                               "in parallel), builds and background merges (IVF k-means)")

    @field_validator("store_url")
    @classmethod
    def _cluster_url_parses(cls, url: str) -> str:
        if is_cluster_url(url):
            parse_cluster_url(url)  # ValueError: start-up fails saying what is wrong with the URL
        return url

    @property
    def uses_redis(self) -> bool:
        return self.store_url.startswith(REDIS_SCHEMES)

    @property
    def uses_redis_cluster(self) -> bool:
        return is_cluster_url(self.store_url)
