"""The operator's commands that need no tensors: database migrations, API keys, the API server,
the re-check of an erasure against its certificate.

``worker.cli`` builds the ``lethe`` command from these plus the commands that train and unlearn.
"""

import argparse
import json
import sys

from app.artifacts import ObjectStore
from app.certificates import certificate_key
from app.ledger import keys, migrate
from app.ledger.db import get_engine, session_scope
from app.settings import get_settings
from app.verification import verify_erasure


def add_app_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    db = commands.add_parser("db", help="the ledger database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="create or migrate the ledger's tables (LETHE_DATABASE_URL) to the newest"
    )
    upgrade.set_defaults(handler=_db_upgrade)

    key = commands.add_parser("keys", help="API keys (the ledger keeps only their hashes)")
    key_commands = key.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--name", required=True, help="who or what uses it, e.g. dashboard")
    create.add_argument(
        "--scopes", nargs="+", required=True, choices=keys.SCOPES, help="what the key may do"
    )
    create.set_defaults(handler=_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.set_defaults(handler=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", type=int, help="the id `lethe keys list` shows")
    revoke.set_defaults(handler=_keys_revoke)

    verify = commands.add_parser(
        "verify-erasure",
        help="re-check a completed request's certificate against the store; exit 1 if it fails",
        description="Checks that every artifact a request's certificate lists as purged is gone "
        "from the store, that nothing derived from the sample is left, and that the certificate "
        "carries this deployment's signature.",
    )
    verify.add_argument("request_id", help="the deletion request's ID")
    verify.set_defaults(handler=_verify_erasure)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP API (uvicorn)",
        description="Serves the HTTP API and the dashboard over the ledger of LETHE_DATABASE_URL. "
        "Jobs go to the broker of LETHE_BROKER_URL; without one they wait in the ledger (only "
        "`lethe demo` runs jobs in the API's process).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(handler=_serve)


def _db_upgrade(_args: argparse.Namespace) -> None:
    migrate.upgrade(get_settings().resolved_database_url)
    print("ledger at head")


def _keys_create(args: argparse.Namespace) -> None:
    with session_scope(get_engine()) as session:
        key = keys.create_key(session, args.name, args.scopes, actor="cli")
    print(key)


def _keys_list(_args: argparse.Namespace) -> None:
    with session_scope(get_engine()) as session:
        for api_key in keys.list_keys(session):
            row = {
                "id": api_key.id,
                "name": api_key.name,
                "prefix": api_key.prefix,
                "scopes": api_key.scopes,
                "revoked": api_key.revoked_at is not None,
            }
            print(json.dumps(row))


def _keys_revoke(args: argparse.Namespace) -> None:
    with session_scope(get_engine()) as session:
        keys.revoke_key(session, args.key_id, actor="cli")
    print(f"key {args.key_id} revoked")


def _verify_erasure(args: argparse.Namespace) -> None:
    settings = get_settings()
    key = certificate_key(settings.resolved_certificate_key_file)
    store = ObjectStore(settings.resolved_store_url)
    with session_scope(get_engine()) as session:
        result = verify_erasure(session, store, args.request_id, key)
    print(json.dumps(result.to_dict(), indent=2))
    if not result.verified:
        sys.exit(1)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.server import HTTP_PROTOCOL

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        http=HTTP_PROTOCOL,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
