"""Queue URLs (daemon/remote/redisurl.py): what parses and what is refused with which message,
secrets masked even in bad URLs, and the client settings every call is bound by (timeouts, TLS files)."""

from __future__ import annotations

import pytest

from daemon.remote import redisurl
from daemon.remote.redisurl import InvalidRedisURL, mask, parse


@pytest.mark.parametrize(
    "url, expect",
    [
        ("redis://localhost", ("redis", "localhost", 6379, 0, None, None)),
        ("redis://h:7000/3", ("redis", "h", 7000, 3, None, None)),
        ("redis://:s3cr%40t@h", ("redis", "h", 6379, 0, None, "s3cr@t")),
        ("rediss://alice:pw@h:6380", ("rediss", "h", 6380, 0, "alice", "pw")),
        ("redis://h?db=5", ("redis", "h", 6379, 5, None, None)),
        ("redis://[::1]:6379/1", ("redis", "::1", 6379, 1, None, None)),
        ("REDIS://H", ("redis", "h", 6379, 0, None, None)),
    ],
)
def test_parse_accepts(url, expect):
    got = parse(url)
    assert (got.scheme, got.host, got.port, got.db, got.username, got.password) == expect
    assert "s3cr" not in repr(got) and "pw" not in repr(got).replace("port", "")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("http://h", "scheme must be redis:// or rediss://"),
        ("h:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://h:99999", "not a valid URL"),
        ("redis://h/x", "database number"),
        ("redis://secret@h", "user without a password"),
        ("redis://:@h", "password is empty"),
        ("redis://h?password=hunter2", "user part"),
        ("redis://h?ssl_ca_certs=/x", "use rediss://"),
        ("rediss://h?ssl_ca_cert=/x", "unknown option 'ssl_ca_cert'"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("redis://h?socket_timeout=0", "socket_timeout must be"),
        ("redis://h?db=x", "db must be a number"),
        ("redis://h#frag", "fragment"),
    ],
)
def test_parse_refuses_with_specific_message(url, fragment):
    with pytest.raises(InvalidRedisURL) as err:
        parse(url)
    assert fragment in str(err.value)
    assert "hunter2" not in str(err.value) and "secret" not in str(err.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:hunter2@h:1/0", "redis://:***@h:1/0"),
        ("rediss://bob:hunter2@h", "rediss://bob:***@h"),
        ("redis://hunter2@h", "redis://***@h"),
        ("redis://h?password=hunter2&db=1", "redis://h?password=***&db=1"),
        ("redis://:hunter2@h:notaport", "redis://:***@h:notaport"),  # unparsable: still masked
        ("redis://h:1", "redis://h:1"),
        ("sqlite", "sqlite"),
    ],
)
def test_mask_hides_secrets_even_in_bad_urls(url, shown):
    assert mask(url) == shown
    assert "hunter2" not in parse_or_message(url)


def parse_or_message(url: str) -> str:
    try:
        return parse(url).masked + repr(parse(url))
    except InvalidRedisURL as exc:
        return str(exc)


def test_is_redis_url():
    assert redisurl.is_redis_url("redis://h") and redisurl.is_redis_url(" rediss://h")
    assert not redisurl.is_redis_url("sqlite") and not redisurl.is_redis_url("")


def test_client_kwargs_bound_every_call_and_check_tls_files(tmp_path):
    kw = redisurl.client_kwargs("redis://:pw@h:1/2")
    assert kw["socket_timeout"] > 0 and kw["socket_connect_timeout"] > 0
    assert kw["retry"].get_retries() <= 3
    kw = redisurl.client_kwargs("redis://h?socket_timeout=2.5", connect_timeout=1)
    assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (2.5, 1)
    with pytest.raises(InvalidRedisURL, match="ssl_ca_certs file not found"):
        redisurl.client_kwargs(f"rediss://h?ssl_ca_certs={tmp_path / 'missing.pem'}")
