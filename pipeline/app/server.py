"""The Gradio app: one login, one `gr.Blocks`, one tab per task type; each tab is its own module.

Login is Gradio's (`launch(auth=...)`), checked against the database's password hashes; who is asking
is then `gr.Request.username` (session.py). Tabs: Rank (rank.py), Write (write.py), Chat (chat_tab.py),
Arena (arena.py), Runs (runs_tab.py), Progress (progress.py) and, for admins, Admin (admin.py). The tabs that chat share
one cache of loaded models (catalog.ModelCache) made in `build_app`; their labels go to the same database.

Concurrency: events that touch the database run on up to `DB_CONCURRENCY` threads (their writes queue
on the database's lock and take a few milliseconds each); model suggestions run one at a time, since
each uses every CPU core.
"""

from __future__ import annotations

import asyncio

import gradio as gr

from pipeline.app import admin, arena, chat_tab, progress, rank, runs_tab, write
from pipeline.app.catalog import ModelCache, RewardModels, memory_budget
from pipeline.app.db import LabelError
from pipeline.app.session import HERE, AppSettings, current_user
from pipeline.app.users import list_users, verify_login

DB_CONCURRENCY = 8


def build_app(settings: AppSettings) -> gr.Blocks:
    # One cache of loaded models for every tab that chats, made here so that each app has its own.
    models = ModelCache(
        settings.store, engine=settings.engine, max_models=settings.max_models, max_bytes=memory_budget()
    )
    rewards = RewardModels(settings.store)  # the reward models chat and the leaderboard score with
    with gr.Blocks(title="rlhf-pipeline: label, chat, arena", analytics_enabled=False) as app:
        with gr.Row(elem_id="header"):
            gr.Markdown("### rlhf-pipeline · label, chat, arena", elem_id="title")
            whoami = gr.Markdown(elem_id="whoami")
        with gr.Tabs():
            with gr.Tab("Rank", id="rank"):
                rank_tab = rank.build(settings)
            with gr.Tab("Write", id="write"):
                write_tab = write.build(settings)
            with gr.Tab("Chat", id="chat"):
                chat_view = chat_tab.build(settings, models, rewards)
            with gr.Tab("Arena", id="arena"):
                arena_view = arena.build(settings, models, rewards)
            with gr.Tab("Runs", id="runs"):
                runs_view = runs_tab.build(settings)
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

        app.load(greet, outputs=[whoami, admin_tab], api_visibility="private")
        rank.on_load(app, rank_tab, settings)
        write.on_load(app, write_tab)
        chat_tab.on_load(app, chat_view, settings)
        arena.on_load(app, arena_view, settings)
        runs_tab.on_load(app, runs_view, settings)
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
