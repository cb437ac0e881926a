"""`redis+cluster://[[user]:password@]host:port[,host:port...][/0]` (TLS: `rediss+cluster://`).

redis-py's own URL parser takes one host; a cluster client wants a list of startup nodes (any one
that answers is enough, the rest of the topology is discovered). `+cluster` keeps the familiar
`redis://` / `rediss://` TLS distinction and cannot be mistaken for a single-server URL. Parsed at
settings time (a malformed URL fails start-up with a message) without importing redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    nodes: list[tuple[str, int]]
    ssl: bool
    username: str | None
    password: str | None


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def parse_cluster_url(url: str) -> ClusterURL:
    """ValueError saying what is wrong unless `url` names at least one host."""
    if not is_cluster_url(url):
        raise ValueError(f"a Redis Cluster URL starts with {' or '.join(CLUSTER_SCHEMES)}")
    scheme, _, rest = url.partition("://")
    if "?" in rest or "#" in rest:
        raise ValueError("Redis Cluster URL: query parameters are not supported")
    userinfo, at, hosts = rest.rpartition("@")
    hosts, _, path = hosts.partition("/")
    if path not in ("", "0"):
        raise ValueError(f"Redis Cluster URL: a cluster has only database 0, not {path!r}")
    nodes = [_host_port(part) for part in hosts.split(",")]
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return ClusterURL(nodes, scheme == "rediss+cluster", username, password)


def _host_port(part: str) -> tuple[str, int]:
    if part.startswith("["):  # IPv6: [::1]:7000
        host, _, port = part[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
    if not host:
        raise ValueError(f"Redis Cluster URL: node {part!r} has no host")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Redis Cluster URL: node {part!r} has no valid port")
    return host, int(port)
