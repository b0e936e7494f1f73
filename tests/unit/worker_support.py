"""Helpers shared by the worker tests: a migrated ledger, a store, and the digits ingested."""

from pathlib import Path

import torch
from sqlalchemy.orm import Session

from app.ledger import migrate
from app.ledger.db import make_engine, open_session
from worker.data import ingest, open_source
from worker.store import ArtifactStore

# The test machine's cores are shared: one thread each avoids oversubscription.
torch.set_num_threads(1)


def ledger_session(folder: Path) -> Session:
    url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    return open_session(make_engine(url))


def digits_store(session: Session, folder: Path) -> ArtifactStore:
    store = ArtifactStore(str(folder / "store"))
    ingest(session, store, open_source("digits"))
    session.commit()
    return store
