"""Replicate through its official Python client `replicate` (daemon side; imported only when a
replicate job runs).

The client reads `REPLICATE_BASE_URL` (a proxy, or the local stand-in the tests run); the token
is passed to it explicitly and never leaves this module. The paid call, `trainings.create`, is
one POST: the client's retrying transport retries only GET/PUT/DELETE-like methods, so it is
never re-sent by the client; lorad retries it only when nothing left this machine.

Errors are sorted as for fal (engines/cloud/errors.py): `Unreachable` (retry with backoff),
`Rejected` (Replicate said no), `SubmissionUncertain` (the create may have been accepted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.cloud.errors import (
    KEYRING_SERVICE,
    KEYS,
    BadKey,
    Rejected,
    ServiceError,
    SubmissionUncertain,
    Unreachable,
    scrub,
)

__all__ = ["BadKey", "Rejected", "ServiceError", "SubmissionUncertain", "Unreachable"]

TOKEN_ENV = "REPLICATE_API_TOKEN"
HOW_TO_SET_TOKEN = (
    f"set {TOKEN_ENV} in lorad's environment (the LaunchAgent/systemd unit or the shell running `lorad run`), "
    f"or store it in the keychain with `keyring set {KEYRING_SERVICE} {TOKEN_ENV}` (needs the optional `keyring` package); "
    "a token is made at https://replicate.com/account/api-tokens"
)
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]{8,200}")  # Replicate tokens: r8_ and letters/digits
TRAINING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
STATES = ("starting", "processing", "succeeded", "failed", "canceled")


def token_problem(token: str, where: str) -> str | None:
    """Why `token` cannot be a Replicate API token (pure); the message never repeats any of it."""
    if TOKEN_CHARS.fullmatch(token):
        return None
    return (
        f"the Replicate API token in {where} is malformed ({len(token)} characters; a token is letters, digits, "
        f"'_' and '-', like r8_...): nothing was sent. Set {TOKEN_ENV} again"
    )


def find_token() -> str | None:
    """REPLICATE_API_TOKEN from the environment, else the keychain (optional `keyring`).
    BadKey (never repeating it) when it is malformed."""
    token, where = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
    if not token:
        try:
            import keyring  # type: ignore[import-not-found]

            token, where = (keyring.get_password(KEYRING_SERVICE, TOKEN_ENV) or "").strip(), "the keychain"
        except Exception:  # no keyring, no backend, a locked keychain: as if none
            return None
    if not token:
        return None
    problem = token_problem(token, where)
    if problem:
        raise BadKey(problem)
    return token


@dataclass
class RemoteTraining:
    """A training as Replicate reports it (`GET /v1/trainings/<id>`), through one constructor."""

    id: str
    state: str  # starting | processing | succeeded | failed | canceled
    logs: str = ""
    error: str | None = None
    weights: str | None = None
    version: str | None = None

    @classmethod
    def of(cls, training: Any) -> RemoteTraining:
        state = str(getattr(training, "status", ""))
        tid = str(getattr(training, "id", ""))
        if state not in STATES or not TRAINING_ID.fullmatch(tid):
            raise Rejected(f"Replicate answered a training lorad cannot read (status {state[:40]!r})")
        output = getattr(training, "output", None)
        weights = output.get("weights") if isinstance(output, dict) else None
        version = output.get("version") if isinstance(output, dict) else None
        error = getattr(training, "error", None)
        return cls(
            tid,
            state,
            str(getattr(training, "logs", None) or "")[-20000:],
            str(error)[:500] if error else None,
            weights if isinstance(weights, str) and weights.startswith(("https://", "http://")) else None,
            version if isinstance(version, str) else None,
        )

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "canceled")


def classify(exc: BaseException) -> ServiceError:
    """The exception as Unreachable or Rejected (Replicate's own detail kept; never a header)."""
    import httpx
    from replicate.exceptions import ReplicateError

    from engines.cloud.download import TooLarge, WrongSize

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (TooLarge, WrongSize)):
        return Rejected(str(exc))
    if isinstance(exc, httpx.LocalProtocolError):
        return Rejected(f"{type(exc).__name__} before sending (a header lorad could not send)")
    if isinstance(exc, ReplicateError):
        code = exc.status or 0
        text = scrub(f"HTTP {code}: {str(exc.detail or exc.title or '')[:400]}")
        return Unreachable(text) if code >= 500 or code == 429 else Rejected(text)
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        text = f"HTTP {code} from {exc.request.url.host}"
        return Unreachable(text) if code >= 500 or code == 429 else Rejected(text)
    if isinstance(exc, (httpx.TransportError, TimeoutError, ConnectionError)):
        return Unreachable(scrub(f"{type(exc).__name__}: {exc}"[:300]) or type(exc).__name__)
    return Rejected(scrub(f"{type(exc).__name__}: {exc}"[:500]))


def create_verdict(code: int) -> str:
    """What the create call's HTTP answer means (pure): 2xx accepted; 429 retry (rate limited,
    not accepted); other 4xx rejected; 408, 5xx and anything else uncertain (it may have run)."""
    if 200 <= code < 300:
        return "accepted"
    if code == 429:
        return "retry"
    if 400 <= code < 500 and code != 408:
        return "rejected"
    return "uncertain"


class ReplicateService:
    def __init__(self, token: str, timeout_s: float = 120.0):
        import httpx
        import replicate

        KEYS.add(token)
        self.timeout_s = timeout_s
        self.client = replicate.Client(
            api_token=token,
            base_url=os.environ.get("REPLICATE_BASE_URL") or None,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
        )

    @staticmethod
    def _guard(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise classify(exc) from None

    def destination_problem(self, destination: str) -> str | None:
        """None when the destination model exists on Replicate; else why not (404: create it)."""
        try:
            self._guard(lambda: self.client.models.get(destination))
        except Rejected as exc:
            if "HTTP 404" in str(exc):
                return (
                    f"[engines.replicate] destination = {destination!r} was not found on Replicate; create it "
                    f"(https://replicate.com/create) or name a model your token can write to"
                )
            raise
        return None

    def trainer_version(self, trainer: str) -> str:
        """The version id to train with: pinned as owner/name:version, else the latest."""
        name, _, pinned = trainer.partition(":")
        if pinned:
            return pinned
        model = self._guard(lambda: self.client.models.get(name))
        version = getattr(getattr(model, "latest_version", None), "id", None)
        if not isinstance(version, str) or not TRAINING_ID.fullmatch(version):
            raise Rejected(f"{name} has no version to train with on Replicate")
        return version

    def upload(self, path: Path) -> str:
        """The dataset zip to Replicate's files API (`POST /v1/files`, the request the client's
        `files.create` builds, but with lorad's timeout: the client sends it with none); the URL
        a training input takes."""
        from replicate.file import _create_file_params, _json_to_file

        def send():
            with open(path, "rb") as fh:
                params = _create_file_params(fh, filename=path.name, content_type="application/zip")
                response = self.client._request("POST", "/v1/files", timeout=self.timeout_s, **params)
            return _json_to_file(response.json())

        uploaded = self._guard(send)
        url = (uploaded.urls or {}).get("get")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise Rejected("Replicate's file upload answered without a URL")
        return url

    def create(self, trainer: str, version: str, arguments: dict, destination: str) -> RemoteTraining:
        """The paid POST, once (see the module docstring): Unreachable only when nothing left this
        machine; SubmissionUncertain for anything after that but before a usable answer."""
        import httpx
        from replicate.exceptions import ReplicateError

        from engines.cloud.submission import certainly_not_sent, kill_point

        try:
            training = self.client.trainings.create(
                model=trainer.partition(":")[0], version=version, input=arguments, destination=destination
            )
        except ReplicateError as exc:
            verdict = create_verdict(exc.status or 0)
            text = scrub(f"HTTP {exc.status}: {str(exc.detail or exc.title or '')[:400]}")
            if verdict == "rejected":
                raise Rejected(text) from None
            if verdict == "retry":
                raise Unreachable(f"{text} (not accepted)") from None
            raise SubmissionUncertain(text) from None
        except Exception as exc:
            if certainly_not_sent(exc):
                raise Unreachable(f"{type(exc).__name__} before the request was sent") from None
            if isinstance(exc, httpx.LocalProtocolError):
                raise Rejected("a header lorad could not send") from None
            raise SubmissionUncertain(f"{type(exc).__name__} after the request was sent") from None
        try:
            remote = RemoteTraining.of(training)
        except Rejected:
            raise SubmissionUncertain("an answer without a usable training id") from None
        kill_point("after_accept")
        return remote

    def get(self, training_id: str) -> RemoteTraining:
        return RemoteTraining.of(self._guard(lambda: self.client.trainings.get(training_id)))

    def cancel(self, training_id: str) -> None:
        self._guard(lambda: self.client.trainings.cancel(training_id))

    def download(self, url: str, dest: Path, cap: int) -> tuple[int, str]:
        """The weights archive (no token sent: delivery URLs are signed), bounded by `cap`."""
        from engines.cloud.download import fetch_capped

        return self._guard(lambda: fetch_capped(url, dest, None, cap, self.timeout_s))
