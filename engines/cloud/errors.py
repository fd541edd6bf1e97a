"""The errors every cloud service adapter raises, sorted by what the cloud engine does with them,
and the scrubbing of the keys a process holds out of their text."""

from __future__ import annotations


class ServiceError(Exception):
    pass


class Unreachable(ServiceError):
    """Worth retrying: the service did not answer, or answered 5xx/429."""


class Rejected(ServiceError):
    """The cloud refused or failed the request; the message is its text."""


class SubmissionUncertain(ServiceError):
    """The submit may have reached the cloud (and been billed); its answer never came or is unusable."""


class BadKey(ServiceError):
    """The configured key cannot be sent (its text is never part of the message)."""


KEYRING_SERVICE = "lorad"  # `keyring set lorad FAL_KEY` (macOS: stored in the login keychain)
KEYS: set[str] = set()  # the cloud keys this process holds: scrubbed from any error text


def scrub(text: str) -> str:
    for key in KEYS:
        text = text.replace(key, "[redacted]")
    return text
