"""``cs-control-plane``: the control-plane store from a shell (migrations, tenants, keys, retention, exports).

It talks to the store directly, as the admin API does; running orchestrator replicas
pick up its changes within ``control_plane.refresh_interval_s``. The store is named by
``--url``, else ``CS_CONTROL_PLANE_URL``, else the ``control_plane.url`` of ``--config``.

Examples::

    cs-control-plane --config serve_config.dev.yaml migrate
    cs-control-plane --config serve_config.dev.yaml tenant create acme --persona "You are Acme's assistant."
    cs-control-plane --config serve_config.dev.yaml key issue --scope storefront --tenant acme --label web
    cs-control-plane --config serve_config.dev.yaml key rotate key_0123456789abcdef --grace-s 3600
    cs-control-plane --config serve_config.dev.yaml key revoke key_0123456789abcdef
    cs-control-plane --config serve_config.dev.yaml purge
    cs-control-plane --config serve_config.dev.yaml export training-data --tenant acme --out acme-reviewed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.config import ControlPlaneConfig, ServiceSettings, TenantConfig, load_app_config
from services.control_plane import insights, schema
from services.control_plane.store import ControlPlaneStore, KeyScope
from services.errors import ServiceError

#: Keys live in the key table: a tenant's profile is shown without them.
KEY_FIELDS = {"api_keys", "ingest_api_keys", "operator_api_keys"}


def _store_config(args: argparse.Namespace) -> ControlPlaneConfig:
    if args.config is None:
        return ControlPlaneConfig()
    config = load_app_config(args.config).resolve_paths(ServiceSettings().config_base_dir or Path.cwd())
    return config.orchestrator.control_plane or ControlPlaneConfig()


def _url(args: argparse.Namespace, store_config: ControlPlaneConfig) -> str:
    if args.url:
        return str(args.url)
    return ServiceSettings().store_url(store_config.url)


def _print(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cs-control-plane", description="Manage the control-plane store.")
    parser.add_argument("--config", type=Path, help="Serve config whose control_plane.url names the store.")
    parser.add_argument("--url", help="SQLAlchemy URL of the store (overrides the config and CS_CONTROL_PLANE_URL).")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="Migrate the schema up (default: to the newest revision).")
    migrate.add_argument("--revision", default="head")
    down = commands.add_parser("downgrade", help="Migrate the schema down ('base' drops every table).")
    down.add_argument("--revision", required=True)
    commands.add_parser("seed", help="Import the tenants and keys of --config (replicas do this when they start).")

    tenant = commands.add_parser("tenant", help="Create, update, show or list tenants.").add_subparsers(
        dest="action", required=True
    )
    tenant.add_parser("list")
    show = tenant.add_parser("show")
    show.add_argument("tenant")
    for name in ("create", "update"):
        sub = tenant.add_parser(name)
        sub.add_argument("tenant")
        sub.add_argument("--persona", required=name == "create")
        sub.add_argument("--fallback-message")
        sub.add_argument("--relevance-threshold", type=float)
        sub.add_argument("--adapter")
        sub.add_argument("--retention-days", type=int)
        sub.add_argument("--storefront-url")
        sub.add_argument("--credentials-env")

    key = commands.add_parser("key", help="Issue, rotate, revoke or list keys.").add_subparsers(
        dest="action", required=True
    )
    issue = key.add_parser("issue")
    issue.add_argument("--scope", required=True, choices=[s.value for s in KeyScope])
    issue.add_argument("--tenant", help="The key's tenant (not for admin keys).")
    issue.add_argument("--label")
    rotate = key.add_parser("rotate")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=float, help="How long the old key stays valid (default: the config's).")
    revoke = key.add_parser("revoke")
    revoke.add_argument("key_id")
    listing = key.add_parser("list")
    listing.add_argument("--tenant")

    commands.add_parser("purge", help="Delete records past each tenant's retention (run it daily).")
    export = commands.add_parser("export", help="Training data (alpaca JSON) or the knowledge-gap report.")
    export.add_argument("kind", choices=["training-data", "knowledge-gaps"])
    export.add_argument("--tenant", required=True)
    export.add_argument("--out", type=Path, help="File to write (default: standard output).")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="Of the knowledge-gap report.")
    export.add_argument("--days", type=int, default=30, help="Period of the knowledge-gap report.")
    return parser


def _profile_changes(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("persona", "fallback_message", "relevance_threshold", "adapter", "retention_days")
    changes: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.storefront_url is not None or args.credentials_env is not None:
        changes["tools"] = {"storefront_url": args.storefront_url, "credentials_env": args.credentials_env}
    return changes


def _run(args: argparse.Namespace, store: ControlPlaneStore, store_config: ControlPlaneConfig) -> Any:
    command, action = args.command, getattr(args, "action", None)
    if command == "migrate":
        schema.upgrade(store.engine, args.revision) if args.revision != "head" else store.migrate()
        return {"revision": schema.current_revision(store.engine)}
    if command == "downgrade":
        schema.downgrade(store.engine, args.revision)
        return {"revision": schema.current_revision(store.engine)}
    store.migrate()  # every other command works on the current schema (a no-op once it is)
    if command == "seed":
        return _seed(args, store)
    if command == "tenant":
        if action == "list":
            return [t.model_dump(mode="json", exclude=KEY_FIELDS) for t in store.tenants()]
        if action == "show":
            return store.tenant(args.tenant).model_dump(mode="json", exclude=KEY_FIELDS)
        changes = _profile_changes(args)
        if action == "create":
            profile = TenantConfig.model_validate({"tenant": args.tenant} | changes)
            return store.create_tenant(profile).model_dump(mode="json", exclude=KEY_FIELDS)
        return store.update_tenant(args.tenant, changes).model_dump(mode="json", exclude=KEY_FIELDS)
    if command == "key":
        if action == "issue":
            issued = store.issue_key(KeyScope(args.scope), args.tenant, args.label)
            return {"key": issued.key} | issued.info
        if action == "rotate":
            grace = args.grace_s if args.grace_s is not None else store_config.key_rotation_grace_s
            issued = store.rotate_key(args.key_id, grace)
            return {"key": issued.key} | issued.info
        if action == "revoke":
            return store.revoke_key(args.key_id)
        return store.keys(args.tenant)
    if command == "purge":
        return {"purged": store.purge(datetime.now(UTC), store_config.retention_days)}
    return _export(args, store, store_config)


def _seed(args: argparse.Namespace, store: ControlPlaneStore) -> Any:
    from services.control_plane.directory import seed_keys

    if args.config is None:
        raise ValueError("seed needs --config")
    config = load_app_config(args.config).orchestrator
    settings = ServiceSettings()
    admin_keys = [k.get_secret_value() for k in config.admin_api_keys] + settings.admin_keys
    store.seed(config.tenants, seed_keys(config.tenants, admin_keys, settings.api_keys))
    return {"tenants": [t.tenant for t in config.tenants], "revision": store.revision()}


def _export(args: argparse.Namespace, store: ControlPlaneStore, store_config: ControlPlaneConfig) -> None:
    if args.kind == "training-data":
        text = json.dumps(insights.alpaca_records(store.reviewed_pairs(args.tenant)), ensure_ascii=False, indent=2)
    else:
        end = datetime.now(UTC)
        with store.session() as session:
            clusters = insights.unanswered_clusters(
                session,
                args.tenant,
                end - timedelta(days=args.days),
                end,
                similarity=store_config.cluster_similarity,
                top=1000,
                examples=5,
            )
        text = insights.gap_report(clusters, args.format)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run one command against the store; print its result as JSON."""
    args = _parser().parse_args(argv)
    store_config = _store_config(args)
    store = ControlPlaneStore(_url(args, store_config), store_config.store_timeout_s)
    try:
        result = _run(args, store, store_config)
    except ServiceError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if result is not None:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
