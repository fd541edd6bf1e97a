"""Queue URLs: parse and check `redis://` / `rediss://` (TLS) URLs, mask their secrets, connect.

One URL is all the machines share (password and TLS included), so it appears in settings, logs,
status and error messages: everything that shows a URL shows `mask(url)` (password -> `***`).
The client factory bounds every Redis call (connect timeout, socket timeout, a short retry), so a
dead or stopped Redis gives an error within seconds, never a hang.

The pure parts (parse, mask) import nothing heavy; redis-py is imported only by `make_client`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    import redis

SCHEMES = ("redis", "rediss")
DEFAULT_PORT = 6379
MASK = "***"
# Seconds. A Redis that does not answer within these is treated as down (TransferError upstream).
DEFAULT_SOCKET_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2

# Query options a queue URL may carry, with what each must look like. Anything else is refused
# (a typo such as `ssl_ca_cert=` would otherwise be passed on silently and TLS would not check).
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
_OPTIONS = _TLS_OPTIONS | {"db", "socket_timeout", "socket_connect_timeout"}
_CERT_REQS = ("required", "optional", "none")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# Query names whose values are secrets (refused by parse, masked by mask anyway).
_SECRET_QUERY = re.compile(r"(?i)^(password|pass|passwd|ssl_password|secret|token)$")


class InvalidRedisURL(ValueError):
    """A queue URL that cannot be used; the message names the problem and never holds a secret."""


@dataclass(frozen=True)
class RedisURL:
    """A checked queue URL. `password` is left out of repr; `masked` is what may be shown."""

    scheme: str
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def masked(self) -> str:
        user = ""
        if self.password is not None:
            user = f"{self.username or ''}:{MASK}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "&".join(f"{k}={v}" for k, v in self.options)
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}" + (f"?{query}" if query else "")

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)


def is_redis_url(value: str) -> bool:
    """True when a `queue` setting names a Redis queue (anything else is the embedded SQLite one)."""
    return value.strip().lower().startswith(("redis://", "rediss://"))


def mask(url: str) -> str:
    """The URL with its password (and any secret-looking query value) replaced by `***`.

    Never raises, also for URLs that do not parse: it is what error messages about bad URLs use."""
    text = str(url)
    # scheme://user:password@host -> scheme://user:***@host; scheme://secret@host -> scheme://***@host
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@", text)
    if match:
        userinfo = match.group(2)
        user, sep, _ = userinfo.partition(":")
        hidden = f"{user}:{MASK}" if sep else MASK
        text = match.group(1) + hidden + "@" + text[match.end() :]
    return re.sub(
        r"(?i)([?&](?:password|pass|passwd|ssl_password|secret|token)=)[^&#]*",
        lambda m: m.group(1) + MASK,
        text,
    )


def parse(url: str) -> RedisURL:
    """Check a queue URL and split it into its parts (pure). Raises InvalidRedisURL naming what is
    wrong and how to write it instead."""
    shown = mask(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidRedisURL(
            f"{shown}: not a valid URL ({exc}); write redis://[:PASSWORD@]HOST[:PORT][/DB]"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidRedisURL(
            f"{shown}: the scheme must be redis:// or rediss:// (TLS), not {scheme + '://' if scheme else 'none'}"
        )
    host = parts.hostname or ""
    if not host:
        raise InvalidRedisURL(f"{shown}: no host; write {scheme}://HOST[:PORT]")
    if parts.fragment:
        raise InvalidRedisURL(f"{shown}: a queue URL has no #fragment")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise InvalidRedisURL(
            f"{shown}: a user without a password; write {scheme}://:PASSWORD@HOST "
            f"(or USER:PASSWORD@HOST for a Redis ACL user)"
        )
    if password == "":
        raise InvalidRedisURL(
            f"{shown}: the password is empty; leave out the user part for a Redis without one"
        )
    db = _db_from_path(parts.path, shown)
    options: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.match(name):
            raise InvalidRedisURL(
                f"{shown}: put the password in the URL's user part ({scheme}://:PASSWORD@HOST), not in ?{name}="
            )
        if name not in _OPTIONS:
            raise InvalidRedisURL(f"{shown}: unknown option {name!r}; known: {', '.join(sorted(_OPTIONS))}")
        _check_option(name, value, scheme, shown)
        if name == "db":
            db = int(value)
            continue
        options.append((name, value))
    return RedisURL(
        scheme=scheme,
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=db,
        username=username or None,
        password=password,
        options=tuple(options),
    )


def _db_from_path(path: str, shown: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidRedisURL(f"{shown}: the path must be a database number (/0, /1, ...), not /{text}")
    return int(text)


def _check_option(name: str, value: str, scheme: str, shown: str) -> None:
    if name in _TLS_OPTIONS and scheme != "rediss":
        raise InvalidRedisURL(f"{shown}: {name} is a TLS option; use rediss:// for TLS")
    if name == "db" and not value.isdigit():
        raise InvalidRedisURL(f"{shown}: db must be a number, not {value!r}")
    if name in ("socket_timeout", "socket_connect_timeout"):
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise InvalidRedisURL(f"{shown}: {name} must be seconds between 0 and 3600, not {value!r}")
    if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
        raise InvalidRedisURL(f"{shown}: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {value!r}")
    if name == "ssl_check_hostname" and value.lower() not in _BOOLS:
        raise InvalidRedisURL(f"{shown}: ssl_check_hostname must be true or false, not {value!r}")
    if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not value:
        raise InvalidRedisURL(f"{shown}: {name} needs a file path")


def client_kwargs(
    url: str | RedisURL,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
    retries: int = DEFAULT_RETRIES,
) -> dict[str, Any]:
    """Keyword arguments for `redis.Redis(**kw)`, every call bounded (make_pool turns them into a
    connection pool, e.g. for huey's RedisHuey(connection_pool=...)).

    Timeouts: the argument, else the URL's option, else the default. TLS files must exist (checked
    here, not at parse, so parse stays pure). A blocking command (BRPOP ...) needs a socket timeout
    longer than its own wait: pass one."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    parsed = url if isinstance(url, RedisURL) else parse(url)
    opt = dict(parsed.options)
    kwargs: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "db": parsed.db,
        "username": parsed.username,
        "password": parsed.password,
        "socket_timeout": socket_timeout
        if socket_timeout is not None
        else float(opt.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)),
        "socket_connect_timeout": (
            connect_timeout
            if connect_timeout is not None
            else float(opt.get("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        ),
        "socket_keepalive": True,
        # Bounded: at most `retries` more tries, 50 ms .. 0.5 s apart (redis-py's default is 10 tries).
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        "decode_responses": False,
    }
    if parsed.tls:
        kwargs["ssl"] = True
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if name in opt:
                path = Path(opt[name]).expanduser()
                if not path.is_file():
                    raise InvalidRedisURL(f"{parsed.masked}: {name} file not found: {path}")
                kwargs[name] = str(path)
        kwargs["ssl_cert_reqs"] = opt.get("ssl_cert_reqs", "required").lower()
        kwargs["ssl_check_hostname"] = _BOOLS[opt.get("ssl_check_hostname", "true").lower()]
    return kwargs


def make_client(
    url: str | RedisURL,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
    retries: int = DEFAULT_RETRIES,
    client_name: str | None = None,
) -> "redis.Redis":
    """A redis-py client for a queue URL with bounded calls (see client_kwargs). Connects lazily:
    the first command raises redis.ConnectionError when the server is not reachable."""
    import redis

    kwargs = client_kwargs(
        url, socket_timeout=socket_timeout, connect_timeout=connect_timeout, retries=retries
    )
    if client_name:
        kwargs["client_name"] = client_name
    return redis.Redis(**kwargs)


def make_pool(
    url: str | RedisURL,
    *,
    socket_timeout: float | None = None,
    connect_timeout: float | None = None,
    retries: int = DEFAULT_RETRIES,
    max_connections: int | None = None,
) -> "redis.ConnectionPool":
    """A connection pool with the same bounds as make_client (TLS: SSLConnection), for libraries
    that take a pool (huey's RedisHuey / PriorityRedisHuey: `connection_pool=`)."""
    import redis

    kwargs = client_kwargs(
        url, socket_timeout=socket_timeout, connect_timeout=connect_timeout, retries=retries
    )
    if kwargs.pop("ssl", False):
        kwargs["connection_class"] = redis.SSLConnection
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    return redis.ConnectionPool(**kwargs)
