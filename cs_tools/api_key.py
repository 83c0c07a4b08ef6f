"""``cs-api-key``: issue API keys and print the digests to store.

``cs-api-key new`` issues a key and prints the digest to store (config or secret);
``cs-api-key digest KEY`` prints the digest of an existing key.
"""

from __future__ import annotations

import argparse

from services.security import key_digest, new_api_key


def main(argv: list[str] | None = None) -> int:
    """Issue a new key, or print the digest of one."""
    parser = argparse.ArgumentParser(prog="cs-api-key", description="Issue API keys and compute their digests.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new", help="Print a new random key and the digest to store.")
    digest = commands.add_parser("digest", help="Print the digest of an existing key.")
    digest.add_argument("key")
    args = parser.parse_args(argv)
    if args.command == "new":
        key = new_api_key()
        print(f"key:    {key}    (give it to the storefront; it is not stored)")
        print(f"digest: {key_digest(key)}    (put this in api_keys or CS_API_KEYS)")
    else:
        print(key_digest(args.key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
