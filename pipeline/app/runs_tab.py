"""The Runs tab: the store's artifacts with their lineage, each run's curves, a PPO run's logged samples.

The artifact view is `rlhf artifacts show`'s text (pipeline.artifacts_view); curves and samples are
read by pipeline.app.run_logs from the artifact and its run folder, and a curve that cannot be read says
why (a run folder that is gone, a run logged to no tracker). Curves are grouped by family (train/loss
and eval/loss in one plot); the familiar families are shown first and any other can be picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from pipeline.app.catalog import headline
from pipeline.app.run_logs import Curves, read_curves, read_samples
from pipeline.app.session import AppSettings, current_user
from pipeline.artifacts_view import format_time, render_show
from pipeline.store import Artifact, StoreError

PLOTS = 6  # plot slots on the page; the first families fill them, the picker changes which
SAMPLE_COLUMNS = ["prompt", "response", "score", "kl"]


def artifact_rows(artifacts: list[Artifact]) -> list[list[str]]:
    """Newest first: id, stage, created, headline metric, what it was made from."""
    rows = []
    for artifact in reversed(artifacts):
        parents = [item.get("artifact", "") for item in artifact.manifest.get("inputs", [])]
        rows.append(
            [
                artifact.id,
                artifact.stage,
                format_time(artifact.manifest.get("created", "")),
                headline(artifact.stage, artifact.metrics),
                ", ".join(p for p in parents if p),
            ]
        )
    return rows


def curves_markdown(curves: Curves) -> str:
    lines = []
    if curves.sources:
        lines.append("Curves from " + "; ".join(curves.sources) + ".")
    lines += [f"**{note}**" for note in curves.notes]
    if not curves.points and not curves.notes:
        lines.append("No curves logged for this artifact.")
    return "\n\n".join(lines)


def plot_updates(curves: Curves, families: list[str]) -> list:
    """One LinePlot update per slot: the chosen families in order, the rest hidden."""
    updates = []
    for slot in range(PLOTS):
        if slot < len(families) and curves.family_rows(families[slot]):
            frame = pd.DataFrame(curves.family_rows(families[slot]))
            updates.append(gr.LinePlot(value=frame, title=families[slot], visible=True))
        else:
            updates.append(gr.LinePlot(value=None, visible=False))
    return updates


def sample_rows(samples: list[dict]) -> list[list]:
    rows = []
    for sample in samples:
        prompt = sample["prompt"]
        user = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt)
        rows.append([user, sample["response"], round(sample["score"], 4), round(sample.get("kl", 0.0), 4)])
    return rows


@dataclass
class RunsTab:
    table: gr.Dataframe
    artifact: gr.Dropdown


def build(settings: AppSettings) -> RunsTab:
    store = settings.store
    gr.Markdown(
        "Every artifact in the store, newest first. Pick one to see its lineage and its run's curves."
    )
    table = gr.Dataframe(
        headers=["id", "stage", "created (UTC)", "headline", "made from"],
        interactive=False,
        wrap=True,
        elem_id="runs-table",
    )
    with gr.Row():
        # Filled per page load; an id is looked up in the store when shown, so any listed one works.
        artifact = gr.Dropdown(
            label="Artifact", choices=[], allow_custom_value=True, elem_id="runs-artifact", scale=3
        )
        refresh = gr.Button("Refresh", size="sm", scale=0)
    with gr.Accordion("Lineage, metrics and config (as `rlhf artifacts show`)", open=False):
        details = gr.Code(language=None, elem_id="runs-details")
    notes = gr.Markdown(elem_id="runs-notes")
    families = gr.Dropdown(label="Curves", multiselect=True, choices=[], elem_id="runs-families")
    with gr.Row(elem_id="runs-plots"):
        plots = [
            gr.LinePlot(x="step", y="value", color="metric", visible=False, height=260, min_width=320)
            for _ in range(PLOTS)
        ]
    with gr.Group(visible=False) as samples_box:
        step = gr.Dropdown(
            label="Logged samples at step", choices=[], allow_custom_value=True, elem_id="runs-step"
        )
        samples = gr.Dataframe(headers=SAMPLE_COLUMNS, interactive=False, wrap=True, elem_id="runs-samples")

    def show(artifact_id: str | None, request: gr.Request):
        current_user(settings, request)
        if not artifact_id:
            nothing = ["", "The store has no artifacts yet.", gr.Dropdown(choices=[], value=[])]
            return (
                nothing + plot_updates(Curves(), []) + [gr.Group(visible=False), gr.Dropdown(choices=[]), []]
            )
        try:
            chosen = store.get(artifact_id)
        except StoreError as err:
            raise gr.Error(str(err)) from None
        curves = read_curves(store, chosen)
        present = curves.families()
        by_step = read_samples(store, chosen)
        steps = list(by_step)
        return [
            render_show(store, chosen),
            curves_markdown(curves),
            gr.Dropdown(choices=present, value=present[:PLOTS]),
            *plot_updates(curves, present[:PLOTS]),
            gr.Group(visible=bool(steps)),
            gr.Dropdown(choices=steps, value=steps[-1] if steps else None),
            sample_rows(by_step[steps[-1]]) if steps else [],
        ]

    def replot(artifact_id: str | None, chosen_families: list[str], request: gr.Request):
        current_user(settings, request)
        if not artifact_id:
            return plot_updates(Curves(), [])
        return plot_updates(read_curves(store, store.get(artifact_id)), list(chosen_families or [])[:PLOTS])

    def samples_at(artifact_id: str | None, at_step: int | None, request: gr.Request):
        current_user(settings, request)
        if not artifact_id or at_step is None:
            return []
        return sample_rows(read_samples(store, store.get(artifact_id)).get(int(at_step), []))

    refresh.click(listing(settings), None, [table, artifact], api_visibility="private")
    artifact.change(
        show,
        [artifact],
        [details, notes, families, *plots, samples_box, step, samples],
        api_name="runs_show",
    )
    families.input(replot, [artifact, families], plots, api_visibility="private")
    step.input(samples_at, [artifact, step], samples, api_name="runs_samples")
    return RunsTab(table, artifact)


def listing(settings: AppSettings):
    """The handler that fills the table and the artifact picker (newest picked)."""

    def fill(request: gr.Request):
        current_user(settings, request)
        artifacts = settings.store.list()
        ids = [a.id for a in reversed(artifacts)]
        return artifact_rows(artifacts), gr.Dropdown(choices=ids, value=ids[0] if ids else None)

    return fill


def on_load(app: gr.Blocks, tab: RunsTab, settings: AppSettings) -> None:
    app.load(listing(settings), outputs=[tab.table, tab.artifact], api_visibility="private")
