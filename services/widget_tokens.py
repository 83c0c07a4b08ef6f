"""Shopper tokens of the storefront widget: short-lived JWTs the storefront backend signs (HS256, PyJWT).

The browser never holds a tenant API key and never names its shopper: the storefront's
backend, which knows who is logged in, signs ``{"sub": <shopper id>, "aud": <tenant>,
"iat", "exp"}`` with the tenant's widget secret, and the widget sends that token. The
platform checks the signature, the audience (a token of one tenant is no token of
another), that it has not expired, and that its lifetime is within the tenant's
``widget.max_token_ttl_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from services.errors import AuthenticationError

#: Clock difference between the storefront and the platform that is tolerated.
LEEWAY_S = 30
#: The least secret length: HS256 keys shorter than the hash are guessable (RFC 7518, section 3.2).
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class WidgetShopper:
    """Who a valid token vouches for."""

    tenant: str
    user_id: str
    expires_at: int


def sign_shopper_token(secret: str, tenant: str, user_id: str, ttl_s: int = 900, now: float | None = None) -> str:
    """A token for one shopper of one tenant (what a storefront backend does; ours in examples/)."""
    issued = int(now if now is not None else time.time())
    claims = {"sub": user_id, "aud": tenant, "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_shopper_token(token: str, secret: str, tenant: str, max_ttl_s: int) -> WidgetShopper:
    """The shopper a token vouches for.

    Raises:
        AuthenticationError: a forged, expired, other tenant's, over-long or malformed token
            (401, naming which).

    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],  # never "none", never an algorithm the token itself picks
            audience=tenant,
            leeway=LEEWAY_S,
            options={"require": ["sub", "aud", "iat", "exp"]},
        )
    except jwt.ExpiredSignatureError as err:
        raise AuthenticationError("widget token expired: ask the storefront for a new one") from err
    except jwt.InvalidAudienceError as err:
        raise AuthenticationError(f"widget token is not for tenant {tenant!r}") from err
    except jwt.InvalidSignatureError as err:
        raise AuthenticationError("widget token signature does not verify") from err
    except jwt.PyJWTError as err:
        raise AuthenticationError(f"invalid widget token: {err}") from err
    subject = claims["sub"]
    if not isinstance(subject, str) or not 1 <= len(subject) <= 128:
        raise AuthenticationError("widget token: sub must be the shopper's id (1 to 128 characters)")
    if int(claims["exp"]) - int(claims["iat"]) > max_ttl_s:
        raise AuthenticationError(f"widget token lives longer than this tenant allows ({max_ttl_s} s)")
    return WidgetShopper(tenant=tenant, user_id=subject, expires_at=int(claims["exp"]))
