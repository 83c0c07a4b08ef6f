"""Write serve_config.yaml into the RayService's serveConfigV2 (one source of truth).

Run after editing serve_config.yaml: ``python scripts/sync_rayservice.py``. With
``--check`` it only reports whether the two differ (exit 1), as the tests do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
RAYSERVICE = REPO_ROOT / "k8s" / "base" / "rayservice.yaml"
BLOCK_START = "  serveConfigV2: |\n"
BLOCK_END = "  rayClusterConfig:\n"
INDENT = "    "


def render(rayservice_text: str, serve_config_text: str) -> str:
    """Return the RayService text with serveConfigV2 replaced by the serve config.

    Args:
        rayservice_text: The RayService manifest; must hold ``serveConfigV2: |`` followed later
            by ``rayClusterConfig:``, both directly under ``spec``.
        serve_config_text: The serve config YAML to embed.

    Raises:
        ValueError: The manifest lacks either marker.

    """
    head, found, rest = rayservice_text.partition(BLOCK_START)
    if not found or BLOCK_END not in rest:
        raise ValueError(f"{RAYSERVICE.name} needs '{BLOCK_START.strip()}' followed by '{BLOCK_END.strip()}'")
    tail = rest[rest.index(BLOCK_END) :]
    block = "".join(INDENT + line if line.strip() else line for line in serve_config_text.splitlines(keepends=True))
    return head + BLOCK_START + block + tail


def main() -> int:
    """Rewrite (or with --check, compare) the RayService's serveConfigV2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if the RayService is out of date.")
    args = parser.parse_args()
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if current == wanted:
        return 0
    if args.check:
        print(f"{RAYSERVICE.relative_to(REPO_ROOT)} differs from serve_config.yaml: run {sys.argv[0]}")
        return 1
    RAYSERVICE.write_text(wanted)
    print(f"updated {RAYSERVICE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
