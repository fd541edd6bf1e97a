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

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.cloud.errors import (
    KEYRING_SERVICE,
    BadKey,
    Rejected,
    ServiceError,
    SubmissionUncertain,
    Unreachable,
    scrub,
)
from engines.cloud.errors import KEYS as _KEYS

KEY_ENV = "FAL_KEY"
HOW_TO_SET_KEY = (
    "set FAL_KEY in lorad's environment (the LaunchAgent/systemd unit or the shell running `lorad run`), "
    "or store it in the keychain with `keyring set lorad FAL_KEY` (needs the optional `keyring` package)"
)


KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))  # printable ASCII, no space


def key_problem(key: str, where: str) -> str | None:
    """Why `key` cannot be an API key (pure); the message never repeats any of it."""
    bad = [i for i, ch in enumerate(key) if ch not in KEY_CHARS]
    if not bad:
        return None
    return (
        f"the fal.ai API key in {where} holds {len(bad)} character(s) that are not printable ASCII "
        f"(whitespace, a control character or non-ASCII, first at position {bad[0] + 1} of {len(key)}); "
        f"nothing was sent. Set it again without them"
    )


def find_key() -> str | None:
    """FAL_KEY from the environment, else FAL_KEY_ID + FAL_KEY_SECRET (as fal-client joins
    them), else the keychain via `keyring` (optional). Surrounding whitespace is dropped; a key
    with whitespace or control characters inside raises BadKey (see key_problem)."""
    key = os.environ.get(KEY_ENV, "").strip()
    where = KEY_ENV
    if not key and os.environ.get("FAL_KEY_ID", "").strip() and os.environ.get("FAL_KEY_SECRET", "").strip():
        key = f"{os.environ['FAL_KEY_ID'].strip()}:{os.environ['FAL_KEY_SECRET'].strip()}"
        where = "FAL_KEY_ID/FAL_KEY_SECRET"
    if key:
        problem = key_problem(key, where)
        if problem:
            raise BadKey(problem)
        return key
    try:
        import keyring  # type: ignore[import-not-found]
    except Exception:
        return None
    try:
        stored = (keyring.get_password(KEYRING_SERVICE, KEY_ENV) or "").strip() or None
    except Exception:  # no backend, locked keychain: as if none
        return None
    if stored and key_problem(stored, "the keychain"):
        raise BadKey(key_problem(stored, "the keychain") or "")
    return stored


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

    from engines.cloud.download import TooLarge, WrongSize

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (TooLarge, WrongSize)):
        return Rejected(str(exc))
    if isinstance(exc, httpx.LocalProtocolError):  # its text may hold a header, the key's included
        return Rejected(f"{type(exc).__name__} before sending (a header lorad could not send)")
    if isinstance(exc, FalClientHTTPError):
        text = f"HTTP {exc.status_code}: {str(exc.message)[:500]}"
        return Unreachable(text) if exc.status_code >= 500 or exc.status_code == 429 else Rejected(text)
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        text = f"HTTP {code} from {exc.request.url.host}"
        return Unreachable(text) if code >= 500 or code == 429 else Rejected(text)
    if isinstance(exc, (httpx.TransportError, TimeoutError, ConnectionError)):
        return Unreachable(scrub(f"{type(exc).__name__}: {exc}"[:300]) or type(exc).__name__)
    return Rejected(scrub(f"{type(exc).__name__}: {exc}"[:500]))


def submit_verdict(code: int, from_fal: bool) -> str:
    """What a submit's HTTP answer means (pure): "accepted"; "rejected" (fal said no: 4xx);
    "retry" (fal's own 5xx or 429: not accepted, and 5xx are never charged, fal's errors doc);
    "uncertain" (408, or a 5xx from the ingress in front of fal, without fal's request header:
    it may have forwarded the request)."""
    if 200 <= code < 300:
        return "accepted"
    if code == 429 or (code >= 500 and from_fal):
        return "retry"
    if 400 <= code < 500 and code != 408:
        return "rejected"
    return "uncertain"


REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def _request_id(body: bytes) -> str | None:
    """fal's submit answer -> its request_id, only when it is a plain id (the one constructor)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and REQUEST_ID.fullmatch(rid) else None


def _detail(body: bytes) -> str:
    """fal's `detail` (and `error_type`) from an error body, bounded, else its first bytes."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(data, dict) and "detail" in data:
        kind = f" ({data['error_type']})" if data.get("error_type") else ""
        return f"{str(data['detail'])[:400]}{kind}"
    return str(data)[:200]


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
        _KEYS.add(key)
        self.client = fc.SyncClient(key=key, default_timeout=timeout_s)

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise classify(exc) from None

    def upload(self, path: Path, expires_s: int | None = None) -> str:
        """The dataset zip to fal's storage (multipart above fal-client's MULTIPART_THRESHOLD),
        expiring after `expires_s` (uploaded files are public by default: not longer than needed)."""
        from fal_client.client import StorageSettings

        lifecycle = StorageSettings(expires_in=int(expires_s)) if expires_s else None
        return self._guard(lambda: self.client.upload_file(path, lifecycle=lifecycle))

    def submit(self, endpoint: str, arguments: dict) -> str:
        """One POST to fal's queue, sent here with httpx to the URL and headers fal-client's
        `submit` uses, without its retry loop: fal has no idempotency key, so a re-sent submit
        may pay twice. Unreachable only when nothing left this machine (connect refused, DNS);
        SubmissionUncertain for anything after that but before a usable answer."""
        import fal_client.client as fc
        from fal_client._headers import add_fal_app_context_headers

        from engines.cloud.submission import certainly_not_sent, kill_point

        headers: dict[str, str] = {}
        add_fal_app_context_headers(headers)
        try:
            response = self.client._client.post(
                fc.QUEUE_URL_FORMAT + endpoint, json=arguments, headers=headers, timeout=self.timeout_s
            )
            body = response.read()
        except Exception as exc:
            if certainly_not_sent(exc):
                raise Unreachable(f"{type(exc).__name__} before the request was sent") from None
            raise SubmissionUncertain(f"{type(exc).__name__} after the request was sent") from None
        code = response.status_code
        verdict = submit_verdict(code, "x-fal-request-id" in response.headers)
        if verdict == "rejected":
            raise Rejected(f"HTTP {code}: {_detail(body)}")
        if verdict == "retry":
            raise Unreachable(f"HTTP {code} from fal (not accepted): {_detail(body)}")
        if verdict == "uncertain":
            raise SubmissionUncertain(f"HTTP {code} from fal's queue: {_detail(body)}")
        request_id = _request_id(body)
        if request_id is None:
            raise SubmissionUncertain(f"HTTP {code} without a usable request_id")
        kill_point("after_accept")
        return request_id

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

    def download(
        self, url: str, dest: Path, expected_size: int | None, cap: int | None = None
    ) -> tuple[int, str]:
        """Stream `url` to dest (atomically, bounded: engines/cloud/download.py); (bytes, sha256).
        Rejected when the body is above the bound or not the size announced."""
        from engines.cloud.download import MAX_RESULT_BYTES, fetch_capped

        return self._guard(
            lambda: fetch_capped(url, dest, expected_size, cap or MAX_RESULT_BYTES, self.timeout_s)
        )
