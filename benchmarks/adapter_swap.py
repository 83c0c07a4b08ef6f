"""Adapter hot swap under load: time from register to the first answer on the new version.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.adapter_swap --model tiny

The app (dev config; tiny model by default) answers a steady load of chat requests from
``--callers`` concurrent callers while the tenant's brand adapter moves through
``--swaps`` new versions. For each: ``POST /admin/adapters/{name}/versions`` (validate,
load-check in the engine, register), then ``PUT /admin/tenants/{tenant}/adapter``
(activate); the swap ends with the first reply voiced by the new version. Every request
of the whole run is checked: any status but 200, or a reply on an unknown version, is a
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    bench_app_args,
    load_sample_kb,
    median,
    mixed_questions,
    ray_cluster,
    resolve_model,
    table,
    write_report,
)

ADAPTER = "brand-voice"
ADMIN = {"Authorization": "Bearer bench-admin"}
CHAT = {"Authorization": "Bearer bench-key"}


async def run(base_url: str, versions: list[str], callers: int) -> tuple[list[list[Any]], dict[str, int]]:
    """Swap through ``versions`` under load; per-swap timings and request counts."""
    import httpx

    questions = mixed_questions()
    counts = {"requests": 0, "failed": 0}
    seen: dict[str, float] = {}  # adapter -> when a reply voiced by it first arrived
    stop = asyncio.Event()
    known = {None, *(f"{ADAPTER}@{v}" for v in versions)}

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

        async def caller(n: int) -> None:
            i = n
            while not stop.is_set():
                body = {"user_id": f"shopper-{n}", "message": questions[i % len(questions)]}
                i += callers
                counts["requests"] += 1
                try:
                    reply = await client.post("/v1/chat", json=body, headers=CHAT)
                    adapter = reply.json().get("adapter") if reply.status_code == 200 else "failed"
                except httpx.HTTPError:
                    adapter = "failed"
                if adapter not in known:
                    counts["failed"] += 1
                    print(f"failed request: {adapter}", file=sys.stderr)
                    continue
                seen.setdefault(adapter, time.monotonic())

        load = [asyncio.create_task(caller(n)) for n in range(callers)]
        rows = []
        for version in versions:
            await asyncio.sleep(1.0)  # steady load on the previous version before each swap (pacing, not sync)
            started = time.monotonic()
            reply = await client.post(f"/admin/adapters/{ADAPTER}/versions", json={"version": version}, headers=ADMIN)
            assert reply.status_code == 201, reply.text
            registered = time.monotonic()
            body = {"adapter": ADAPTER, "version": version}
            reply = await client.put("/admin/tenants/lumen/adapter", json=body, headers=ADMIN)
            assert reply.status_code == 200, reply.text
            activated = time.monotonic()
            name = f"{ADAPTER}@{version}"
            while name not in seen:
                await asyncio.sleep(0.01)  # polling the load generator's replies
            rows.append([version, registered - started, activated - registered, seen[name] - started])
            print(f"swap to {version}: {rows[-1]}", file=sys.stderr)
        stop.set()
        await asyncio.gather(*load)
    return rows, counts


def main() -> None:
    """Start the app with an adapter store, swap under load, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built now) or a folder; adapters are built for tiny")
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--callers", type=int, default=8)
    args = parser.parse_args()
    from ray import serve

    from cs_testing.tiny_models import build_tiny_lora
    from services.app import build_app

    with tempfile.TemporaryDirectory(prefix="cs-swap-") as tmp:
        workdir = Path(tmp)
        model, dtype = resolve_model(args.model, workdir)
        versions = [f"v{n}" for n in range(1, args.swaps + 1)]
        for n, version in enumerate(versions, start=1):
            build_tiny_lora(model, workdir / "adapters" / ADAPTER / version, seed=n)
        app_args = bench_app_args(model, dtype, workdir / "kb.db", max_tokens=32)
        app_args["llm"] |= {"adapters_dir": str(workdir / "adapters"), "max_lora_rank": 8}
        app_args["orchestrator"]["admin_api_keys"] = ["bench-admin"]
        load_sample_kb(workdir / "kb.db", app_args)
        with ray_cluster() as cluster:
            serve.run(build_app(app_args), name="customer-service", route_prefix="/")
            rows, counts = asyncio.run(run(cluster["http_url"], versions, args.callers))
    sections = [
        f"Model `{args.model}`, {args.callers} concurrent callers sending chat requests all along "
        f"({counts['requests']} requests in all), {args.swaps} swaps to a new adapter version each "
        "(LoRA r=8 on every projection).\n\n"
        + table(["to version", "register s", "activate s", "register to first answer on it s"], rows)
        + f"\n\nMedian register to first answer: {median(r[3] for r in rows):.2f} s. "
        f"**Failed requests during the swaps: {counts['failed']}** of {counts['requests']}.",
    ]
    write_report("adapter_swap", "Adapter hot swap under load", "python -m benchmarks.adapter_swap", sections, {})


if __name__ == "__main__":
    main()
