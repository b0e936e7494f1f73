"""The operator's commands that need no tensors: database migrations, API keys, the API server.

``worker.cli`` builds the ``lethe`` command from these plus the commands that train and unlearn.
"""

import argparse
import json

from app.ledger import keys, migrate
from app.ledger.db import get_engine, session_scope
from app.settings import get_settings


def add_app_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    db = commands.add_parser("db", help="ledger database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply Alembic migrations up to head")
    upgrade.set_defaults(handler=_db_upgrade)

    key = commands.add_parser("keys", help="API keys")
    key_commands = key.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", nargs="+", required=True, choices=keys.SCOPES)
    create.set_defaults(handler=_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.set_defaults(handler=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(handler=_keys_revoke)

    serve = commands.add_parser("serve", help="run the HTTP API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
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
