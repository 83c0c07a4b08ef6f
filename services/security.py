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


def shopper_hash(tenant: str, user_id: str, secret: bytes | None) -> str:
    """What stands for a shopper in stored records: a keyed hash of tenant and user id (hex).

    Keyed (HMAC-SHA256) when a secret is set, so a leaked record does not give away the id
    by trying likely ones; the same on every replica that shares the secret.
    """
    message = f"{tenant}\0{user_id}".encode("utf-8", "surrogatepass")
    if secret is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
