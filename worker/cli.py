"""The ``lethe`` command. Tensor work is imported inside the handlers, so that ``lethe keys`` and
``lethe serve`` run in the API image, which has no torch."""

import argparse
import sys
from collections.abc import Sequence

from app.cli import add_app_commands
from app.ledger.errors import LedgerError
from worker.commands import add_worker_commands
from worker.demo import add_demo_command
from worker.scheduler import add_scheduler_command

DESCRIPTION = (
    "Lethe honours right-to-be-forgotten requests against trained PyTorch models. Settings "
    "come from LETHE_* environment variables (or .env); by default everything runs embedded, "
    "under ./lethe-data. Start with `lethe demo`."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    add_app_commands(commands)
    add_worker_commands(commands)
    add_scheduler_command(commands)
    add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except LedgerError as error:
        sys.exit(f"lethe: {error}")


if __name__ == "__main__":
    main()
