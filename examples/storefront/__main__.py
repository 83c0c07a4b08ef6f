"""Run the example storefront: ``python -m examples.storefront --port 8100 --db data/storefront.db``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn

from examples.storefront.app import create_app


def main() -> None:
    """Serve the storefront (its API and its product page)."""
    parser = argparse.ArgumentParser(description="Example storefront backend (orders, tickets, coupons).")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--db", type=Path, default=Path("data/storefront.db"))
    parser.add_argument(
        "--app-url", default="http://127.0.0.1:8000", help="The platform, whose widget the page embeds."
    )
    parser.add_argument(
        "--widget-secret-env", default="LUMEN_WIDGET_SECRET", help="Variable holding the tenant's widget secret."
    )
    args = parser.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    app = create_app(args.db, app_url=args.app_url, widget_secret=os.environ.get(args.widget_secret_env))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
