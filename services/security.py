"""API-key digests: the only form in which keys are stored or compared.

Keys are random 256-bit tokens, so an unsalted SHA-256 digest cannot be reversed, and a
leaked config or secret reveals no key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

#: Stored form of an API key: its SHA-256 digest.
KEY_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


def key_digest(key: str) -> str:
    """The stored form of a configured key; a value that already is a digest is returned as it is."""
    if re.fullmatch(KEY_DIGEST_PATTERN, key):
        return key
    return presented_key_digest(key)


def presented_key_digest(presented: str) -> str:
    """Digest of a key a caller presents: always hashed, so a stolen digest is no key."""
    return "sha256:" + hashlib.sha256(presented.encode()).hexdigest()


def matches_any(presented: str, digests: list[str]) -> bool:
    """Whether a presented key has one of the digests (compared in constant time per digest)."""
    digest = presented_key_digest(presented).encode()
    return any(hmac.compare_digest(digest, d.encode()) for d in digests)


def new_api_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "cs_" + secrets.token_urlsafe(32)
