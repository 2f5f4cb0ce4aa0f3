"""The Gradio app: one login, one `gr.Blocks`, one tab per task type; each tab is its own module.

Who is asking comes only from the login (`gr.Request.username`), checked against the database on every
event, so a role change or a removed user takes effect at once; no form field ever names a user.
Tabs: Rank (rank.py), Write (write.py), Progress (progress.py) and, for admins, Admin (admin.py).
The chat, arena and runs tabs of issue 12 are further modules added to `build_app` the same way, with
their tables in the same database.

Concurrency: events that touch the database run on up to `DB_CONCURRENCY` threads (their writes queue
on the database's lock and take a few milliseconds each); model suggestions run one at a time, since
each uses every CPU core.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import LEASE_SECONDS
from pipeline.app.users import User, get_user, list_users, verify_login
from pipeline.store import ArtifactStore

HERE = Path(__file__).parent
DEFAULT_GUIDELINES = HERE / "guidelines.md"
DB_CONCURRENCY = 8


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


def build_app(settings: AppSettings) -> gr.Blocks:
    from pipeline.app import admin, progress, rank, write

    with gr.Blocks(title="RLHF labelling", analytics_enabled=False) as app:
        with gr.Row(elem_id="header"):
            gr.Markdown("### RLHF labelling", elem_id="title")
            whoami = gr.Markdown(elem_id="whoami")
        with gr.Tabs():
            with gr.Tab("Rank", id="rank"):
                rank_tab = rank.build(settings)
            with gr.Tab("Write", id="write"):
                write_tab = write.build(settings)
            with gr.Tab("Progress", id="progress") as progress_block:
                progress_tab = progress.build(settings)
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                admin_view = admin.build(settings)

        def greet(request: gr.Request):
            user = current_user(settings, request)
            return (
                f"Signed in as **{user.name}** ({user.role}) · [Log out](logout)",
                gr.Tab(visible=user.is_admin),
            )

        app.load(greet, outputs=[whoami, admin_tab], api_name=False)
        rank.on_load(app, rank_tab, settings)
        write.on_load(app, write_tab)
        progress.on_load(app, progress_block, progress_tab, settings)
        admin.on_load(app, admin_tab, admin_view, settings)
    return app


def login_check(settings: AppSettings):
    """Gradio's auth callback: scrypt takes ~50 ms, so it runs off the server's event loop."""

    async def check(username: str, password: str) -> bool:
        return await asyncio.to_thread(verify_login, settings.db, username, password)

    return check


def launch(
    settings: AppSettings, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True
) -> gr.Blocks:
    """Serve the app with login required; with block=False return at once (`.local_url`, `.close()`)."""
    if not list_users(settings.db):
        raise LabelError(
            f"no users in {settings.db.path}: add one first with `rlhf label users add NAME --role admin`"
        )
    app = build_app(settings)
    app.queue(default_concurrency_limit=DB_CONCURRENCY)
    app.launch(
        server_name=host,
        server_port=port,
        auth=login_check(settings),
        auth_message="Sign in with the account an admin made for you (`rlhf label users add`).",
        prevent_thread_lock=not block,
        ssr_mode=False,
        quiet=not block,
        footer_links=["api"],
        css=(HERE / "style.css").read_text(encoding="utf-8"),
        js=(HERE / "keyboard.js").read_text(encoding="utf-8"),
    )
    return app
