"""Run the example storefront: ``python -m examples.storefront --port 8100 --db data/storefront.db``."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from examples.storefront.app import create_app


def main() -> None:
    """Serve the storefront API."""
    parser = argparse.ArgumentParser(description="Example storefront backend (orders, tickets, coupons).")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--db", type=Path, default=Path("data/storefront.db"))
    args = parser.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(args.db), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
