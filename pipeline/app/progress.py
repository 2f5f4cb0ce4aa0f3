"""The Progress tab: everyone sees their own counts and latest labels; admins also see everyone's counts."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipeline.app import reports
from pipeline.app.session import AppSettings, current_user

# Row keys from pipeline.app.reports, and the column headers they are shown under.
COUNT_COLUMNS = [
    "user",
    "rankings",
    "demonstrations",
    "prompts",
    "undone",
    "discarded",
    "median_seconds_per_ranking",
]
COUNT_HEADERS = [
    "annotator",
    "rankings",
    "demonstrations",
    "prompts",
    "undone",
    "discarded",
    "median s per ranking",
]
LABEL_COLUMNS = ["label", "kind", "task", "summary", "submitted", "retracted"]


@dataclass
class ProgressTab:
    summary: gr.Markdown
    mine: gr.Dataframe
    everyone: gr.Dataframe
    refresh: gr.Button

    def outputs(self) -> list:
        return [self.summary, self.mine, self.everyone]


def build(settings: AppSettings) -> ProgressTab:
    summary = gr.Markdown(elem_id="progress-summary")
    mine = gr.Dataframe(headers=LABEL_COLUMNS, label="Your latest labels", interactive=False, wrap=True)
    everyone = gr.Dataframe(
        headers=COUNT_HEADERS, label="Everyone's labels", interactive=False, visible=False
    )
    refresh = gr.Button("Refresh", elem_id="progress-refresh")
    tab = ProgressTab(summary, mine, everyone, refresh)

    def refresh_progress(request: gr.Request):
        return show(settings, request)

    refresh.click(refresh_progress, outputs=tab.outputs(), api_name="progress")
    return tab


def show(settings: AppSettings, request: gr.Request) -> list:
    user = current_user(settings, request)
    own = reports.progress(settings.db, user.name)[0]
    text = (
        f"Your labels: rankings **{own['rankings']}** · demonstrations **{own['demonstrations']}** · "
        f"prompts **{own['prompts']}** · undone {own['undone']} · discarded by an admin {own['discarded']}"
    )
    if own["median_seconds_per_ranking"] is not None:
        text += f" · median time per ranking {own['median_seconds_per_ranking']} s"
    mine = reports.labels_of(settings.db, user, user.name)
    everyone = reports.progress(settings.db) if user.is_admin else []
    return [
        text,
        [[row[c] for c in LABEL_COLUMNS] for row in mine],
        gr.Dataframe(value=[[row[c] for c in COUNT_COLUMNS] for row in everyone], visible=user.is_admin),
    ]


def on_load(app: gr.Blocks, block: gr.Tab, tab: ProgressTab, settings: AppSettings) -> None:
    """Fill the tab when the page loads, and again each time the tab is opened."""

    def load(request: gr.Request):
        return show(settings, request)

    app.load(load, outputs=tab.outputs(), api_visibility="private")
    block.select(load, outputs=tab.outputs(), api_visibility="private")
