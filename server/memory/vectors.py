"""The Chroma client and per-tenant collections.

Embedded `PersistentClient` in the data directory by default; `HttpClient` to a Chroma
server when `ENCLAVE_CHROMA_URL` is set, so several replicas share one set of vectors.
Embeddings are always computed by our own Embedder and passed in: collections carry no
embedding function, so Chroma never tries to fetch its default model from a hub.
Each tenant gets its own collections (isolation by construction, not only by filter), and
each vector store its own collection: a store's search walks that store's index alone, not
a tenant-wide one filtered by store (at 100k chunks the filtered query took 250 ms, the
store's own index a few).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from server.errors import ConfigError, ServiceUnavailableError

log = logging.getLogger(__name__)


def collection_name(kind: str, tenant: str, part: str = "") -> str:
    # Chroma names allow [a-zA-Z0-9._-], 3-512 characters; tenants may be anything. The
    # tenant is part of every name, so one tenant's part cannot name another's collection.
    key = f"{tenant}\0{part}" if part else tenant
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _check_access(base: str, url: str, headers: dict[str, str] | None) -> None:
    """Ask the endpoint the Chroma client itself calls first, to tell a gateway's refusal
    (401/403, which the client reports as a bare ValueError) from an unreachable server."""
    try:
        status = httpx.get(f"{base}/api/v2/auth/identity", headers=headers, timeout=10).status_code
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the Chroma server at ENCLAVE_CHROMA_URL={url}: {exc}") from None
    if status in (401, 403):
        which = "refused ENCLAVE_CHROMA_TOKEN" if headers else "asks for credentials: set ENCLAVE_CHROMA_TOKEN"
        raise ConfigError(f"the Chroma server at ENCLAVE_CHROMA_URL={url} {which} (HTTP {status})")


class ChromaCollections:
    """A thin wrapper that caches collections and turns Chroma failures into our errors."""

    def __init__(self, client: Any):
        self._client = client
        self._collections: dict[str, Any] = {}

    @classmethod
    def open(cls, data_dir: Path, url: str | None = None, token: str | None = None) -> ChromaCollections:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        chroma_settings = ChromaSettings(anonymized_telemetry=False)
        if token and not url:
            raise ConfigError("ENCLAVE_CHROMA_TOKEN is set but ENCLAVE_CHROMA_URL is not: the embedded Chroma takes no token")
        if url:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError(f"ENCLAVE_CHROMA_URL must look like http://host:port, not {url!r}")
            port = parsed.port or (443 if parsed.scheme == "https" else 8000)
            headers = {"Authorization": f"Bearer {token}"} if token else None
            _check_access(f"{parsed.scheme}://{parsed.hostname}:{port}", url, headers)
            try:
                client = chromadb.HttpClient(
                    host=parsed.hostname,
                    port=port,
                    ssl=parsed.scheme == "https",
                    headers=headers,
                    settings=chroma_settings,
                )
                client.heartbeat()
            except Exception as exc:
                raise ConfigError(f"cannot reach the Chroma server at ENCLAVE_CHROMA_URL={url}: {exc}") from None
        else:
            path = data_dir / "chroma"
            path.mkdir(parents=True, exist_ok=True)
            client = chromadb.PersistentClient(path=str(path), settings=chroma_settings)
        return cls(client)

    def collection(self, kind: str, tenant: str, part: str = "", index: dict[str, Any] | None = None) -> Any:
        """The collection of `kind` for a tenant (and a part of it, such as one vector
        store), created on first use; `index`: HNSW parameters beside the cosine space,
        fixed when the collection is made."""
        name = collection_name(kind, tenant, part)
        found = self._collections.get(name)
        if found is None:
            try:
                found = self._client.get_or_create_collection(
                    name, embedding_function=None, configuration={"hnsw": {"space": "cosine", **(index or {})}}, metadata={"kind": kind}
                )
            except Exception as exc:
                log.exception("chroma: opening collection %s failed", name)
                raise ServiceUnavailableError("the vector store is unavailable; retry shortly") from exc
            self._collections[name] = found
        return found

    def existing(self, kind: str, tenant: str, part: str = "") -> Any | None:
        """The collection if it exists; never creates one."""
        from chromadb.errors import NotFoundError as ChromaNotFound

        name = collection_name(kind, tenant, part)
        try:
            return self._client.get_collection(name, embedding_function=None)
        except ChromaNotFound:
            return None
        except Exception as exc:
            log.exception("chroma: looking up collection %s failed", name)
            raise ServiceUnavailableError("the vector store is unavailable; retry shortly") from exc

    def drop(self, kind: str, tenant: str, part: str = "") -> None:
        """Delete the collection and its vectors (nothing to do when it does not exist)."""
        from chromadb.errors import NotFoundError as ChromaNotFound

        name = collection_name(kind, tenant, part)
        self._collections.pop(name, None)
        try:
            self._client.delete_collection(name)
        except ChromaNotFound:
            return
        except Exception as exc:
            log.exception("chroma: deleting collection %s failed", name)
            raise ServiceUnavailableError("the vector store is unavailable; retry shortly") from exc
