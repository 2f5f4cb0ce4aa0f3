"""What every tab's handlers share: the app's settings, who is asking, and how a refusal is shown.

Who is asking comes only from the login (`gr.Request.username`), checked against the database on every
event, so a role change or a removed user takes effect at once; no form field ever names a user.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import LEASE_SECONDS
from pipeline.app.users import User, get_user
from pipeline.store import ArtifactStore

HERE = Path(__file__).parent  # the app's own files: default guidelines, style, keyboard script
DEFAULT_GUIDELINES = HERE / "guidelines.md"


@dataclass
class AppSettings:
    """What the app serves and how."""

    db: LabelDB
    """The label database."""
    store: ArtifactStore
    """The artifact store that exports publish into and suggestions load models from."""
    guidelines: str = field(default_factory=lambda: DEFAULT_GUIDELINES.read_text(encoding="utf-8"))
    """Markdown shown beside every task."""
    lease_seconds: float = LEASE_SECONDS
    """How long a task stays reserved for the annotator it was given to."""
    suggest_models: list[str] = field(default_factory=list)
    """Model sources the Write tab can draft replies with (empty: no suggestions)."""
    engine: str = "auto"
    """Sampling engine for suggestions (pipeline.generation)."""
    suggest_sampling: dict = field(
        default_factory=lambda: {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9}
    )
    """pipeline.generation.SamplingSettings for suggestions."""
    seed: int = 0
    """Seed of the suggestions' draws: each suggestion takes the next seed of a generator seeded with it."""
    max_models: int = 3
    """Models the chat and arena tabs keep loaded (least recently used dropped first; also within half
    the machine's memory)."""


@contextmanager
def shown_as_error() -> Iterator[None]:
    """A LabelError becomes the error message the person sees; anything else is a bug and propagates."""
    try:
        yield
    except LabelError as err:
        raise gr.Error(str(err)) from None


def current_user(settings: AppSettings, request: gr.Request) -> User:
    user = get_user(settings.db, request.username)
    if user is None:
        raise gr.Error("not signed in, or your account was removed: sign in again")
    return user
