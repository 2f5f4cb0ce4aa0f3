"""The Arena tab: two models answer one prompt side by side, a person votes, and only then learns which was which.

A round, as FastChat's anonymous arena runs it (its state on the server, names after the vote):

1. The person writes a prompt and presses Send. In anonymous mode the server draws two different models from
   the catalog (pipeline.app.catalog) and puts them on random sides; in named mode the person picks both.
2. Both replies stream together: one generator steps the two model streams in turn (`side_by_side`), so
   the two panels grow at the same pace. The vote buttons stay locked until both replies have ended.
3. A vote (left, right, tie, both bad) is stored as an `arena_vote` label (pipeline.app.votes), under the
   round's own key: a second click, or a replayed request, stores nothing more. The names are shown, and
   the buttons locked for good; the next prompt starts a new round.

What the page receives before the vote is the prompt, the two replies and "Model A" / "Model B": the round
(which model is on which side) lives in `gr.State`, which Gradio keeps on the server and never sends to
the browser. A model that fails to load in an anonymous round is reported without its name.

The Leaderboard sub-tab shows pipeline.app.leaderboard's table, with a reward model's verdicts on the
same votes beside the human ones when one is chosen.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import gradio as gr

from pipeline.app.catalog import ModelCache, RewardModels, list_models, list_reward_models
from pipeline.app.db import LabelError
from pipeline.app.leaderboard import agreement, blind, leaderboard, rm_verdicts
from pipeline.app.render import chat_html
from pipeline.app.session import AppSettings, current_user, shown_as_error
from pipeline.app.tasks import Submitted
from pipeline.app.votes import VERDICTS, Reply, arena_votes, record_arena_vote
from pipeline.errors import UserError
from pipeline.generation import SamplingSettings

ANONYMOUS, NAMED = "Anonymous", "Named"
MODES = {ANONYMOUS: "anonymous", NAMED: "named"}
SIDES = ("Model A", "Model B")
VOTE_LABELS = {"left": "A is better", "right": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
NO_REWARD = ""
LEADERBOARD_COLUMNS = [
    "#",
    "model",
    "rating",
    "95% interval",
    "votes",
    "W/T/L",
    "both bad",
    "win rate",
    "RM win rate",
]


@dataclass
class Round:
    """One prompt, two models, at most one vote. Kept on the server (gr.State)."""

    key: str
    """The idempotency key of this round's vote."""
    mode: str
    """"anonymous" or "named"."""
    left: str
    right: str
    """The model refs (pipeline.app.catalog) on each side."""
    prompt: list[dict]
    sampling: dict
    """SamplingSettings fields and the seed, the same for both sides."""
    started: float = field(default_factory=time.time)
    replies: list[str] = field(default_factory=lambda: ["", ""])
    artifact_ids: list[str | None] = field(default_factory=lambda: [None, None])
    streamed: bool = False
    """Both replies have ended: voting opens."""
    verdict: str | None = None
    """Set by the vote; the names are shown from then on."""

    @property
    def names_shown(self) -> bool:
        return self.mode == "named" or self.verdict is not None


def pick_sides(
    mode: str, models: list[str], picked: tuple[str | None, str | None], rng: random.Random
) -> tuple[str, str]:
    """The (left, right) refs of a new round: drawn at random in anonymous mode, as picked in named mode."""
    if mode == "named":
        left, right = picked
        if not left or not right:
            raise LabelError("pick a model for each side (named mode), or switch to anonymous mode")
        if left == right:
            raise LabelError("pick two different models: a model compared with itself says nothing")
        return left, right
    distinct = sorted(set(models))
    if len(distinct) < 2:
        raise LabelError(
            "the arena needs at least two chat models in the store (base, sft or ppo artifacts, or PPO checkpoints)"
        )
    left, right = rng.sample(distinct, 2)
    return left, right


def new_round(
    mode: str,
    models: list[str],
    picked: tuple[str | None, str | None],
    prompt_text: str,
    sampling: SamplingSettings,
    rng: random.Random,
) -> Round:
    if not prompt_text.strip():
        raise LabelError("write a prompt first")
    left, right = pick_sides(mode, models, picked, rng)
    seed = rng.randrange(2**31)
    prompt = [{"role": "user", "content": prompt_text.strip()}]
    return Round(secrets.token_urlsafe(16), mode, left, right, prompt, asdict(sampling) | {"seed": seed})


def side_by_side(left: Iterator[str], right: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Both replies as they grow: one step of each stream in turn, until both have ended."""
    streams, texts, live = (left, right), ["", ""], [True, True]
    while any(live):
        for side in (0, 1):
            if live[side]:
                try:
                    texts[side] = next(streams[side])
                except StopIteration:
                    live[side] = False
        yield texts[0], texts[1]


def play(round_: Round, cache: ModelCache) -> Iterator[Round]:
    """Load both models, then stream both replies into the round; the last yield has `streamed` set."""
    refs = (round_.left, round_.right)
    try:
        round_.artifact_ids = [cache.get(ref).artifact_id for ref in refs]
    except UserError as err:  # a model, store or checkpoint that cannot be loaded, said in one line
        if round_.mode == "named":
            raise LabelError(str(err)) from None
        raise LabelError("one of this round's models could not be loaded: start a new round") from None
    settings = SamplingSettings(**{k: v for k, v in round_.sampling.items() if k != "seed"})
    seed = round_.sampling["seed"]
    # A stream holds its model's lock from its first step to its end (ModelCache.stream). Two rounds of the
    # same two models on opposite sides, each stepping its left stream first, would each hold one lock and
    # wait for the other for ever; stepping them in one order everywhere (by ref) rules that out.
    order = sorted((0, 1), key=lambda side: refs[side])
    streams = [cache.stream(refs[side], round_.prompt, settings, seed) for side in order]
    try:
        for texts in side_by_side(*streams):
            replies = ["", ""]
            for side, text in zip(order, texts, strict=True):
                replies[side] = text
            round_.replies = replies
            yield round_
    finally:
        # When one stream fails (or the page goes away), the other must release its model's lock now, not
        # when the garbage collector reaches the failed frames.
        for stream in streams:
            stream.close()
    round_.streamed = True
    yield round_


def cast_vote(settings: AppSettings, user: str, round_: Round | None, verdict: str) -> Submitted:
    """Store the round's vote, once; a round still streaming, or already voted on, is refused."""
    if round_ is None:
        raise LabelError("no round to vote on: write a prompt and press Send")
    if verdict not in VERDICTS:
        raise LabelError(f"unknown verdict {verdict!r}")
    if not round_.streamed:
        raise LabelError("wait until both replies have finished")
    if round_.verdict is not None:
        raise LabelError("this round has its vote: start a new round with a new prompt")
    sides = [
        Reply(text, ref, artifact_id, round_.sampling)
        for text, ref, artifact_id in zip(
            round_.replies, (round_.left, round_.right), round_.artifact_ids, strict=True
        )
    ]
    saved = record_arena_vote(
        settings.db,
        user,
        round_.key,
        round_.prompt,
        sides[0],
        sides[1],
        verdict,
        mode=round_.mode,
        seconds=time.time() - round_.started,
    )
    if saved.duplicate:  # a second click raced the first: the page shows what was stored
        raise LabelError("this round has its vote: start a new round with a new prompt")
    round_.verdict = verdict
    return saved


# -- what the page shows ------------------------------------------------------------------------------


@dataclass
class ArenaTab:
    state: gr.State
    mode: gr.Radio
    left_model: gr.Dropdown
    right_model: gr.Dropdown
    prompt_view: gr.HTML
    titles: tuple[gr.Markdown, gr.Markdown]
    panels: tuple[gr.HTML, gr.HTML]
    status: gr.Markdown
    votes: dict[str, gr.Button]
    reward: gr.Dropdown
    table: gr.Dataframe
    summary: gr.Markdown

    def round_outputs(self) -> list:
        return [self.state, self.prompt_view, *self.titles, *self.panels, self.status, *self.votes.values()]


def model_labels(settings: AppSettings) -> dict[str, str]:
    """Catalog ref -> its one-line label (stage, id, date, metric)."""
    return {entry.ref: entry.label for entry in list_models(settings.store)}


def round_view(round_: Round | None, labels: dict[str, str], status: str) -> list:
    """Values for ArenaTab.round_outputs(). A model's name appears only once `names_shown`."""
    if round_ is None:
        empty = chat_html([], empty="The reply appears here.")
        return [None, "", *SIDES, empty, empty, status, *[gr.Button(interactive=False) for _ in VERDICTS]]
    titles = list(SIDES)
    if round_.names_shown:
        titles = [
            f"{side}: **{labels.get(ref, ref)}**"
            for side, ref in zip(SIDES, (round_.left, round_.right), strict=True)
        ]
    panels = [
        chat_html([{"role": "assistant", "content": text}] if text else [], empty="Waiting for the model…")
        for text in round_.replies
    ]
    open_vote = round_.streamed and round_.verdict is None and all(text.strip() for text in round_.replies)
    buttons = [gr.Button(interactive=open_vote) for _ in VERDICTS]
    return [round_, chat_html(round_.prompt), *titles, *panels, status, *buttons]


def status_of(round_: Round) -> str:
    if round_.verdict is not None:
        return f"Voted: **{VOTE_LABELS[round_.verdict]}**. Write a new prompt for the next round."
    if not round_.streamed:
        return "Both models are answering…"
    if not all(text.strip() for text in round_.replies):
        return "A model wrote nothing, so this round cannot be voted on: write a new prompt."
    return "Which reply is better? Vote to see which models they were."


def leaderboard_view(
    settings: AppSettings, reward_ref: str, *, rewards: RewardModels, seed: int = 0
) -> tuple[list[list], str]:
    """The leaderboard's rows and a line under it; with a reward model (loaded once, through `rewards`, the
    cache the chat scores with), its verdicts beside the human ones."""
    every_vote = arena_votes(settings.db)
    votes = blind(every_vote)
    named = len(every_vote) - len(votes)
    if not votes:
        return [], f"No anonymous arena votes yet{f' ({named} named, which are not rated)' if named else ''}."
    rm_scores = None
    if reward_ref:
        with rewards.lock:
            rm_scores = rm_verdicts(votes, rewards.get(reward_ref))
    standings = leaderboard(votes, rm_scores=rm_scores, seed=seed)
    labels = model_labels(settings)
    rows = [
        [
            place,
            labels.get(s.model, s.model),
            round(s.rating),
            f"{s.lower:.0f} – {s.upper:.0f}",
            s.votes,
            f"{s.wins}/{s.ties}/{s.losses}",
            s.both_bad,
            f"{s.win_rate:.0%}",
            "–" if s.rm_win_rate is None else f"{s.rm_win_rate:.0%}",
        ]
        for place, s in enumerate(standings, 1)
    ]
    summary = (
        f"{len(votes)} vote{'' if len(votes) == 1 else 's'}. Bradley-Terry ratings on the Elo scale (1000 is "
        "the mean model) with 95% bootstrap "
        "intervals; W/T/L counts wins, ties (both bad included) and losses; the win rate counts a tie as half."
    )
    if named:
        summary += (
            f" {named} named-mode vote{'' if named == 1 else 's'} not rated: the names were shown first."
        )
    if rm_scores is not None:
        agreed, decisive = agreement(votes, rm_scores)
        if decisive:
            summary += f" The reward model agrees with {agreed} of {decisive} decisive votes ({agreed / decisive:.0%})."
    return rows, summary


def build(
    settings: AppSettings, cache: ModelCache, rewards: RewardModels, rng: random.Random | None = None
) -> ArenaTab:
    """The tab's components and events; `rng` draws the models and sides (default: the system's randomness)."""
    rng = rng or random.SystemRandom()
    state = gr.State(None)
    with gr.Tabs():
        with gr.Tab("Battle", id="arena-battle"):
            with gr.Row():
                mode = gr.Radio(
                    [ANONYMOUS, NAMED], value=ANONYMOUS, label="Mode", elem_id="arena-mode", scale=1
                )
                left_model = gr.Dropdown(label="Model A", visible=False, elem_id="arena-left-model", scale=2)
                right_model = gr.Dropdown(
                    label="Model B", visible=False, elem_id="arena-right-model", scale=2
                )
            gr.Markdown(
                "Two models answer the same prompt. In anonymous mode you learn which they were only after "
                "your vote, and your vote trains the next reward model.",
                elem_id="arena-intro",
            )
            prompt_view = gr.HTML(elem_id="arena-prompt")
            with gr.Row(equal_height=False):
                with gr.Column():
                    left_title = gr.Markdown(SIDES[0], elem_id="arena-left-title")
                    left_panel = gr.HTML(chat_html([], empty="The reply appears here."), elem_id="arena-left")
                with gr.Column():
                    right_title = gr.Markdown(SIDES[1], elem_id="arena-right-title")
                    right_panel = gr.HTML(
                        chat_html([], empty="The reply appears here."), elem_id="arena-right"
                    )
            status = gr.Markdown(elem_id="arena-status")
            with gr.Row():
                votes = {
                    verdict: gr.Button(label, interactive=False, elem_id=f"arena-vote-{verdict}")
                    for verdict, label in VOTE_LABELS.items()
                }
            with gr.Row():
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="Ask both models something",
                    lines=2,
                    scale=5,
                    elem_id="arena-prompt-box",
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="arena-send")
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top_p")
                max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="max_new_tokens")
        with gr.Tab("Leaderboard", id="arena-leaderboard") as leaderboard_tab:
            with gr.Row():
                reward = gr.Dropdown(
                    label="Reward model: its verdicts on the same votes beside the human ones (optional)",
                    choices=[("none", NO_REWARD)],
                    value=NO_REWARD,
                    scale=4,
                    elem_id="arena-reward",
                )
                refresh = gr.Button("Refresh", scale=1, elem_id="arena-refresh")
            table = gr.Dataframe(headers=LEADERBOARD_COLUMNS, interactive=False, elem_id="arena-table")
            summary = gr.Markdown(elem_id="arena-summary")
    tab = ArenaTab(
        state=state,
        mode=mode,
        left_model=left_model,
        right_model=right_model,
        prompt_view=prompt_view,
        titles=(left_title, right_title),
        panels=(left_panel, right_panel),
        status=status,
        votes=votes,
        reward=reward,
        table=table,
        summary=summary,
    )

    def on_mode(chosen: str):
        if chosen != NAMED:
            return gr.Dropdown(visible=False), gr.Dropdown(visible=False)
        choices = [(entry.label, entry.ref) for entry in list_models(settings.store)]
        return gr.Dropdown(choices=choices, visible=True), gr.Dropdown(choices=choices, visible=True)

    def on_send(request: gr.Request, chosen_mode, left_ref, right_ref, text, temp, nucleus, length):
        current_user(settings, request)
        with shown_as_error():
            try:
                sampling = SamplingSettings(int(length), float(temp), float(nucleus))
            except ValueError as err:
                raise LabelError(str(err)) from None
            models = [entry.ref for entry in list_models(settings.store)] if chosen_mode == ANONYMOUS else []
            round_ = new_round(MODES[chosen_mode], models, (left_ref, right_ref), text or "", sampling, rng)
            labels = model_labels(settings) if round_.names_shown else {}
            yield round_view(round_, labels, "Loading the models…")
            for update in play(round_, cache):
                yield round_view(update, labels, status_of(update))

    def on_vote(verdict: str):
        def vote(request: gr.Request, round_: Round | None):
            user = current_user(settings, request)
            with shown_as_error():
                cast_vote(settings, user.name, round_, verdict)
            return round_view(round_, model_labels(settings), status_of(round_))

        return vote

    def on_refresh(reward_ref: str):
        with shown_as_error():
            rows, line = leaderboard_view(settings, reward_ref or NO_REWARD, rewards=rewards)
        return gr.Dataframe(value=rows, headers=LEADERBOARD_COLUMNS), line

    mode.change(on_mode, [mode], [left_model, right_model], api_visibility="private")
    gr.on(
        [send.click, prompt.submit],
        on_send,
        [mode, left_model, right_model, prompt, temperature, top_p, max_new_tokens],
        tab.round_outputs(),
        api_name="arena_send",
        concurrency_id="models",  # the chat tab's generation budget: both tabs sample on the same cores
        concurrency_limit=2,
    )
    for verdict, button in votes.items():
        button.click(on_vote(verdict), [state], tab.round_outputs(), api_name=f"arena_vote_{verdict}")
    refresh.click(on_refresh, [reward], [table, summary], api_name="arena_leaderboard")
    leaderboard_tab.select(on_refresh, [reward], [table, summary], api_visibility="private")
    return tab


def on_load(app: gr.Blocks, tab: ArenaTab, settings: AppSettings) -> None:
    """Offer the reward models published so far (the leaderboard itself fills when its tab opens)."""

    def fill():
        choices = [("none", NO_REWARD)] + [
            (entry.label, entry.ref) for entry in list_reward_models(settings.store)
        ]
        return gr.Dropdown(choices=choices, value=NO_REWARD)

    app.load(fill, outputs=[tab.reward], api_visibility="private")
