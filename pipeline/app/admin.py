"""The Admin tab: the queue, labels per annotator, agreement, export, and managing labels and passwords.

The tab is shown only to admins, but hiding it protects nothing: every handler here checks the
caller's role itself, and an annotator calling one through the API is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipeline.app import reports, tasks
from pipeline.app.agreement import agreement_summary
from pipeline.app.db import LabelError
from pipeline.app.export import export_labels
from pipeline.app.progress import COUNT_COLUMNS, COUNT_HEADERS, LABEL_COLUMNS
from pipeline.app.session import AppSettings, current_user, shown_as_error
from pipeline.app.users import User, list_users, set_password

QUEUE_COLUMNS = ["kind", "tasks", "waiting", "in_progress", "done", "labels", "labels_wanted"]
QUEUE_HEADERS = ["task kind", "tasks", "waiting", "in progress", "done", "labels", "labels wanted"]


@dataclass
class AdminView:
    queue: gr.Dataframe
    counts: gr.Dataframe
    agreement: gr.Markdown
    users: list[gr.Dropdown]

    def outputs(self) -> list:
        return [self.queue, self.counts, self.agreement, *self.users]


def require_admin(settings: AppSettings, request: gr.Request) -> User:
    user = current_user(settings, request)
    if not user.is_admin:
        raise gr.Error("only admins can do this")
    return user


def build(settings: AppSettings) -> AdminView:
    refresh = gr.Button("Refresh", elem_id="admin-refresh")
    with gr.Row():
        queue = gr.Dataframe(headers=QUEUE_HEADERS, label="Tasks by state", interactive=False)
        agreement = gr.Markdown(elem_id="admin-agreement")
    counts = gr.Dataframe(headers=COUNT_HEADERS, label="Labels per annotator", interactive=False)
    with gr.Row():
        export = gr.Button("Export a labels artifact", variant="primary", elem_id="admin-export")
        exported = gr.Markdown(elem_id="admin-exported")
    with gr.Accordion("An annotator's labels", open=False):
        with gr.Row():
            # allow_custom_value: the choices are filled per admin session; the handler checks who may look.
            whose = gr.Dropdown(label="Annotator", choices=[], allow_custom_value=True, scale=3)
            show_labels = gr.Button("Show", scale=1)
        their_labels = gr.Dataframe(headers=LABEL_COLUMNS, interactive=False, wrap=True)
        with gr.Row():
            label_id = gr.Number(label="Label id", precision=0)
            reason = gr.Textbox(label="Reason for discarding it")
            discard = gr.Button("Discard label", variant="stop")
        discarded = gr.Markdown()
    with gr.Accordion("Reset a password", open=False):
        with gr.Row():
            reset_user = gr.Dropdown(label="User", choices=[], allow_custom_value=True)
            new_password = gr.Textbox(label="New password", type="password")
            reset = gr.Button("Set password")
        reset_done = gr.Markdown()
    view = AdminView(queue, counts, agreement, [whose, reset_user])

    def labels_of(request: gr.Request, name: str):
        viewer = current_user(settings, request)  # one's own labels, or anyone's for an admin
        with shown_as_error():
            rows = reports.labels_of(settings.db, viewer, name or "")
        return [[row[c] for c in LABEL_COLUMNS] for row in rows]

    def export_now(request: gr.Request):
        require_admin(settings, request)
        with shown_as_error():
            artifact = export_labels(settings.db, settings.store)
        figures = ", ".join(f"{k} {v}" for k, v in artifact.metrics.items() if isinstance(v, int))
        return f"Published **{artifact.id}** ({figures}). Train on it with `--data labels:latest`."

    def discard_label(request: gr.Request, number: float | None, why: str):
        admin = require_admin(settings, request)
        with shown_as_error():
            if number is None:
                raise LabelError("enter the id of the label to discard")
            tasks.discard(settings.db, admin.name, int(number), why or "")
        return f"Label {int(number)} discarded."

    def reset_password(request: gr.Request, name: str, password: str):
        require_admin(settings, request)
        with shown_as_error():
            set_password(settings.db, name or "", password or "")
        return f"New password set for {name}."

    def overview(request: gr.Request):
        return show(settings, request)

    refresh.click(overview, outputs=view.outputs(), api_name="admin_overview")
    show_labels.click(labels_of, inputs=[whose], outputs=[their_labels], api_name="labels_of")
    export.click(export_now, outputs=[exported], api_name="export_labels")
    discard.click(discard_label, inputs=[label_id, reason], outputs=[discarded], api_name="discard_label")
    reset.click(
        reset_password, inputs=[reset_user, new_password], outputs=[reset_done], api_name="reset_password"
    )
    return view


def show(settings: AppSettings, request: gr.Request) -> list:
    require_admin(settings, request)
    summary = agreement_summary(reports.live_rankings(settings.db))
    if summary["items"]:
        text = (
            f"**Agreement** on {summary['items']} tasks ranked by more than one annotator "
            f"({summary['annotator_pairs']} annotator pairs): pairwise "
            f"{fmt(summary['pairwise_agreement'])}, Kendall tau {fmt(summary['kendall_tau'])}."
        )
        text += "".join(f"\n- {name}: {fmt(value)}" for name, value in summary["per_annotator"].items())
    else:
        text = "**Agreement:** no task has been ranked by more than one annotator yet (see `--overlap`)."
    names = [user.name for user in list_users(settings.db)]
    return [
        [[row[c] for c in QUEUE_COLUMNS] for row in reports.queue_summary(settings.db)],
        [[row[c] for c in COUNT_COLUMNS] for row in reports.progress(settings.db)],
        text,
        gr.Dropdown(choices=names),
        gr.Dropdown(choices=names),
    ]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def on_load(app: gr.Blocks, block: gr.Tab, view: AdminView, settings: AppSettings) -> None:
    """Fill the tab for an admin when the page loads, and again each time the tab is opened."""

    def load(request: gr.Request):
        user = current_user(settings, request)
        return show(settings, request) if user.is_admin else [gr.skip()] * len(view.outputs())

    app.load(load, outputs=view.outputs(), api_visibility="private")
    block.select(load, outputs=view.outputs(), api_visibility="private")
