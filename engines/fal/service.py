"""fal.ai through the official `fal-client` (daemon side; imported only when a fal job runs).

`fal_client` reads its queue host from FAL_QUEUE_RUN_HOST / FAL_RUN_HOST when it is imported; its
storage hosts (`REST_URL`, `CDN_URL`) are constants, which `FAL_REST_URL` / `FAL_CDN_URL` replace
here (a proxy, or the local stand-in of the service the tests run). The key is passed to the
client explicitly and never leaves this module: no log line, error, status or marker shows it.

Errors are sorted in two: `Unreachable` (connection refused or reset, timeouts, HTTP 5xx and 429:
worth retrying with backoff) and `Rejected` (any other HTTP error: fal said no; its text is the
job's error).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.fsutil import temp_beside

KEY_ENV = "FAL_KEY"
KEYRING_SERVICE = "lorad"  # `keyring set lorad FAL_KEY` (macOS: stored in the login keychain)
HOW_TO_SET_KEY = (
    "set FAL_KEY in lorad's environment (the LaunchAgent/systemd unit or the shell running `lorad run`), "
    "or store it in the keychain with `keyring set lorad FAL_KEY` (needs the optional `keyring` package)"
)


class ServiceError(Exception):
    pass


class Unreachable(ServiceError):
    """Worth retrying: the service did not answer, or answered 5xx/429."""


class Rejected(ServiceError):
    """fal refused or failed the request; the message is fal's text."""


def find_key() -> str | None:
    """FAL_KEY from the environment, else from the keychain via `keyring` (optional)."""
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key
    try:
        import keyring  # type: ignore[import-not-found]
    except Exception:
        return None
    try:
        return (keyring.get_password(KEYRING_SERVICE, KEY_ENV) or "").strip() or None
    except Exception:  # no backend, locked keychain: as if none
        return None


@dataclass
class RemoteStatus:
    state: str  # IN_QUEUE | IN_PROGRESS | COMPLETED
    position: int | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def classify(exc: BaseException) -> ServiceError:
    """The exception as Unreachable or Rejected (fal's own text kept; never a header)."""
    import httpx
    from fal_client.client import FalClientHTTPError

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, FalClientHTTPError):
        text = f"HTTP {exc.status_code}: {str(exc.message)[:500]}"
        return Unreachable(text) if exc.status_code >= 500 or exc.status_code == 429 else Rejected(text)
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        text = f"HTTP {code} from {exc.request.url.host}"
        return Unreachable(text) if code >= 500 or code == 429 else Rejected(text)
    if isinstance(exc, (httpx.TransportError, TimeoutError, ConnectionError)):
        return Unreachable(f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__)
    return Rejected(f"{type(exc).__name__}: {exc}"[:500])


class FalService:
    def __init__(self, key: str, timeout_s: float = 120.0):
        import fal_client.client as fc

        for name, env in (("REST_URL", "FAL_REST_URL"), ("CDN_URL", "FAL_CDN_URL")):
            if os.environ.get(env):
                setattr(fc, name, os.environ[env].rstrip("/"))
        if os.environ.get(
            "FAL_QUEUE_RUN_HOST"
        ):  # read by fal_client at import; again here, for a process that imported it earlier
            fc.QUEUE_URL_FORMAT = f"https://{os.environ['FAL_QUEUE_RUN_HOST']}/"
        self.timeout_s = timeout_s
        self.client = fc.SyncClient(key=key, default_timeout=timeout_s)

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise classify(exc) from None

    def upload(self, path: Path) -> str:
        return self._guard(lambda: self.client.upload_file(path))

    def submit(self, endpoint: str, arguments: dict) -> str:
        return self._guard(lambda: self.client.submit(endpoint, arguments).request_id)

    def status(self, endpoint: str, request_id: str) -> RemoteStatus:
        from fal_client import Completed, InProgress, Queued

        status = self._guard(lambda: self.client.status(endpoint, request_id, with_logs=True))
        if isinstance(status, Queued):
            return RemoteStatus("IN_QUEUE", position=status.position)
        if isinstance(status, InProgress):
            return RemoteStatus("IN_PROGRESS", logs=list(status.logs or []))
        if isinstance(status, Completed):
            return RemoteStatus("COMPLETED", logs=list(status.logs or []), error=status.error)
        raise Rejected(f"unknown status {status!r}")

    def result(self, endpoint: str, request_id: str) -> dict:
        return self._guard(lambda: self.client.result(endpoint, request_id))

    def cancel(self, endpoint: str, request_id: str) -> None:
        self._guard(lambda: self.client.cancel(endpoint, request_id))

    def download(self, url: str, dest: Path, expected_size: int | None) -> tuple[int, str]:
        """Stream `url` to dest (atomically); (bytes, sha256). Rejected when the body is not
        the size the result or the Content-Length announced (a truncated or swapped file)."""
        import httpx

        def fetch() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            fd, tmp = temp_beside(dest)
            try:
                with (
                    os.fdopen(fd, "wb") as out,
                    httpx.stream("GET", url, timeout=self.timeout_s, follow_redirects=True) as response,
                ):
                    response.raise_for_status()
                    announced = response.headers.get("content-length")
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if announced is not None and int(announced) != size:
                    raise Rejected(f"the LoRA download is {size} bytes, the server announced {announced}")
                if expected_size is not None and expected_size != size:
                    raise Rejected(f"the LoRA download is {size} bytes, fal's result says {expected_size}")
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return size, digest.hexdigest()

        return self._guard(fetch)
