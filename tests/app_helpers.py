"""A label database with known users, and the app served in-process on a free port, for the app's tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

from pipeline.app.db import LabelDB, open_db
from pipeline.app.users import add_user

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22", "carol": "carol-secret-333"}
ROLES = {"alice": "annotator", "bob": "admin", "carol": "annotator"}


def label_db(folder: Path) -> LabelDB:
    db = open_db(folder / "labels.db", app_version="test")
    for name, password in PASSWORDS.items():
        add_user(db, name, ROLES[name], password)
    return db


@contextmanager
def served(settings) -> Iterator[str]:
    """The app on 127.0.0.1 and a free port, for the duration of the block; yields its base URL."""
    from pipeline.app.server import launch

    port = free_port()
    app = launch(settings, port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.close()
