"""The Chat tab: talk to any model in the store, see what a reward model thinks of each reply.

A conversation lives on the server (`gr.State`) as turns: each turn is a user message and every reply
drawn for it (regenerating adds a reply; the newest is shown and continues the conversation). Each reply
keeps the model ref it came from, the artifact that ref resolved to and its sampling settings and seed,
so a thumbs up/down (a `chat_feedback` label, pipeline.app.votes) and "send to ranking" (a ranking task of
the turn's distinct replies, pipeline.app.tasks) carry where every text came from.

Replies stream from the shared model cache (pipeline.app.catalog.ModelCache), with the model's own chat
template and stop tokens (pipeline.generation: the engines stage 3 samples with). With a reward artifact
chosen, each finished reply is scored by pipeline.scoring, exactly as `rlhf reward score` scores it:
raw, and standardised with the artifact's own statistics ((raw - reward_mean) / reward_std over the SFT
demonstrations: 0 is a typical demonstration, +1 one standard deviation better).

The i-th draw of a turn uses seed `seed + i`, so regenerating gives a different reply, and the same
settings give the same replies again.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import gradio as gr

from pipeline.app import tasks
from pipeline.app.catalog import ModelCache, RewardModels, list_models, list_reward_models
from pipeline.app.db import LabelError
from pipeline.app.session import AppSettings, current_user, shown_as_error
from pipeline.app.votes import Reply, record_chat_feedback
from pipeline.errors import UserError
from pipeline.generation import SamplingSettings

NO_REWARD = ""


@dataclass
class Answer:
    """One reply drawn for a turn."""

    text: str
    ref: str
    """The model ref it came from (catalog.ModelEntry.ref)."""
    artifact_id: str | None
    sampling: dict[str, Any]
    """temperature, top_p, max_new_tokens, seed."""
    score: Score | None = None
    feedback: int | None = None
    """The id of this person's live rating label on it, if they rated it."""

    def reply(self) -> Reply:
        return Reply(self.text, self.ref, self.artifact_id, self.sampling)


@dataclass(frozen=True)
class Score:
    """A reward model's view of one reply."""

    raw: float
    standardised: float
    reward_id: str | None

    def text(self) -> str:
        return f"RM raw {self.raw:.3f} · standardised {self.standardised:+.3f}"


@dataclass
class Turn:
    user: str
    answers: list[Answer] = field(default_factory=list)
    task_id: int | None = None
    """The ranking task its replies were sent to, once sent."""

    @property
    def shown(self) -> Answer | None:
        return self.answers[-1] if self.answers else None


@dataclass
class Conversation:
    system: str = ""
    turns: list[Turn] = field(default_factory=list)

    def prompt(self, upto: int) -> list[dict]:
        """The messages the model answers in turn `upto`: system, earlier turns with their shown replies,
        then that turn's user message."""
        messages = [{"role": "system", "content": self.system}] if self.system.strip() else []
        for turn in self.turns[:upto]:
            messages.append({"role": "user", "content": turn.user})
            messages.append({"role": "assistant", "content": turn.shown.text if turn.shown else ""})
        messages.append({"role": "user", "content": self.turns[upto].user})
        return messages

    def chatbot(self, streaming: str | None = None) -> list[dict]:
        """The Chatbot's messages; `streaming`: the text so far of the last turn's reply being drawn."""
        shown = []
        for i, turn in enumerate(self.turns):
            shown.append({"role": "user", "content": turn.user})
            if i == len(self.turns) - 1 and streaming is not None:
                shown.append({"role": "assistant", "content": streaming or "…"})
            elif turn.shown is not None:
                shown.append({"role": "assistant", "content": answer_markdown(turn)})
        return shown


def answer_markdown(turn: Turn) -> str:
    """A reply as shown: its text, then a line with its model, which draw it is and its score."""
    answer = turn.shown
    assert answer is not None
    facts = [answer.artifact_id or answer.ref, f"seed {answer.sampling['seed']}"]
    if len(turn.answers) > 1:
        facts.append(f"reply {len(turn.answers)} of {len(turn.answers)} drawn")
    if answer.score is not None:
        facts.append(answer.score.text())
    if turn.task_id is not None:
        facts.append(f"sent to ranking as task {turn.task_id}")
    return f"{answer.text}\n\n<sub>{' · '.join(facts)}</sub>"


def score_reply(rewards: RewardModels, ref: str, prompt: list[dict], text: str) -> Score:
    """The reward model `ref`'s raw and standardised score of one reply."""
    with rewards.lock:  # one reward model scores at a time: the replies being drawn need the cores
        model = rewards.get(ref)
        raw = model.score(prompt, [text])[0]
    return Score(raw, model.normalise(raw), model.artifact_id)


@dataclass
class ChatSettings:
    """What the settings panel holds."""

    model: str
    reward: str
    system: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    def sampling(self) -> SamplingSettings:
        try:
            return SamplingSettings(int(self.max_new_tokens), float(self.temperature), float(self.top_p))
        except ValueError as err:
            raise gr.Error(str(err)) from None


def draw(
    conversation: Conversation,
    index: int,
    chosen: ChatSettings,
    cache: ModelCache,
    rewards: RewardModels,
) -> Iterator[tuple[Conversation, str | None]]:
    """Draw one more reply for turn `index` (the last turn): (conversation, text so far) while it streams,
    then (conversation, None) with the reply added and scored. A message left with no reply (an error, or
    the page gone mid-stream) is dropped: kept, later prompts would carry an empty assistant turn and the
    Chatbot's numbering would shift."""
    turn = conversation.turns[index]
    try:
        prompt = conversation.prompt(index)
        settings = chosen.sampling()
        seed = int(chosen.seed) + len(turn.answers)
        yield conversation, ""
        text = ""
        for text in cache.stream(chosen.model, prompt, settings, seed):
            yield conversation, text
        policy = cache.get(chosen.model)
        sampling = asdict(settings) | {"seed": seed}
        answer = Answer(text, chosen.model, policy.artifact_id, sampling)
        if chosen.reward:
            answer.score = score_reply(rewards, chosen.reward, prompt, text)
        turn.answers.append(answer)
        yield conversation, None
    finally:
        if not turn.answers and index < len(conversation.turns) and conversation.turns[index] is turn:
            del conversation.turns[index:]


def ranking_task(conversation: Conversation, index: int, user: str) -> tasks.NewTask:
    """A turn's distinct replies as a ranking task of the labelling queue."""
    turn = conversation.turns[index]
    distinct: dict[str, Answer] = {}
    for answer in turn.answers:
        if answer.text.strip():
            distinct.setdefault(answer.text, answer)
    if len(distinct) < 2:
        raise LabelError(
            "a ranking task needs two different replies to one message: press Regenerate to draw another"
        )
    completions = [
        tasks.Completion(a.text, a.ref, a.artifact_id, a.sampling)
        for a in list(distinct.values())[: tasks.MAX_K]
    ]
    return tasks.NewTask("rank", conversation.prompt(index), f"chat by {user}", completions)


def send_to_ranking(settings: AppSettings, conversation: Conversation, user: str) -> int:
    """Queue the last turn's replies as a ranking task (once); its task id."""
    if not conversation.turns:
        raise LabelError("nothing to send yet: chat first, then regenerate to get replies to compare")
    turn = conversation.turns[-1]
    if turn.task_id is None:
        turn.task_id = tasks.add_tasks(
            settings.db, [ranking_task(conversation, len(conversation.turns) - 1, user)]
        )[0]
    return turn.task_id


def rate(
    settings: AppSettings, conversation: Conversation, message_index: int, liked: bool, user: str
) -> str:
    """Store a thumbs up or down on the reply at Chatbot message `message_index` (a changed rating replaces
    the earlier one)."""
    index = message_index // 2
    if message_index % 2 == 0 or index >= len(conversation.turns) or conversation.turns[index].shown is None:
        raise LabelError("only a model's reply can be rated")
    turn = conversation.turns[index]
    answer = turn.shown
    submitted = record_chat_feedback(
        settings.db,
        user,
        secrets.token_urlsafe(16),
        conversation.prompt(index),
        answer.reply(),
        "up" if liked else "down",
        replaces=answer.feedback,
    )
    answer.feedback = submitted.label_id
    return f"Rated reply {index + 1} {'up' if liked else 'down'} (label {submitted.label_id})."


# -- the tab ---------------------------------------------------------------------------------------------


@dataclass
class ChatTab:
    model: gr.Dropdown
    reward: gr.Dropdown


def model_choices(settings: AppSettings) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    models = [(e.label, e.ref) for e in list_models(settings.store)]
    rewards = [("none", NO_REWARD)] + [(e.label, e.ref) for e in list_reward_models(settings.store)]
    return models, rewards


def build(settings: AppSettings, cache: ModelCache, rewards: RewardModels) -> ChatTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Conversation", height=480, editable="user", elem_id="chat-log", buttons=["copy"]
            )
            message = gr.Textbox(
                label="Message",
                placeholder="Write a message and press Enter",
                lines=2,
                elem_id="chat-message",
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                regenerate = gr.Button("Regenerate", elem_id="chat-regenerate")
                to_ranking = gr.Button("Send to ranking", elem_id="chat-to-ranking")
                clear = gr.Button("Clear", elem_id="chat-clear")
            status = gr.Markdown(elem_id="chat-status")
        with gr.Column(scale=2):
            # Choices come per page load (models published since start included); a ref is checked against
            # the store's list when used, so the server's own copy of the choices need not hold it.
            model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, elem_id="chat-model")
            reward = gr.Dropdown(
                label="Reward model (scores each reply)",
                choices=[],
                allow_custom_value=True,
                elem_id="chat-reward",
            )
            refresh = gr.Button("Refresh the model list", size="sm")
            system = gr.Textbox(label="System prompt", lines=2, elem_id="chat-system")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(
                1, 1024, value=256, step=1, label="max_new_tokens", elem_id="chat-max-new-tokens"
            )
            seed = gr.Number(value=0, precision=0, label="seed")
            gr.Markdown(
                "Editing one of your messages (the pencil on it) drops what came after it and answers anew. "
                "Thumbs rate the reply; **Send to ranking** queues the last message's different replies "
                "(press Regenerate for more) as a ranking task."
            )
    conversation = gr.State(None)  # a Conversation once the first message is sent
    knobs = [model, reward, system, temperature, top_p, max_new_tokens, seed]

    def chosen(values: dict) -> ChatSettings:
        """The settings panel's values (Gradio passes a set of inputs as one dict by component), the model
        and reward model checked to be ones the store offers."""
        picked = ChatSettings(*(values[knob] for knob in knobs))
        models, reward_models = model_choices(settings)
        if picked.model not in {ref for _, ref in models}:
            raise gr.Error(f"no model {picked.model!r} in the store: pick one from the list")
        if picked.reward not in {ref for _, ref in reward_models}:
            raise gr.Error(f"no reward model {picked.reward!r} in the store: pick one from the list")
        return picked

    def streamed(conv: Conversation, index: int, picked: ChatSettings) -> Iterator[tuple]:
        try:
            for now, text in draw(conv, index, picked, cache, rewards):
                yield now.chatbot(streaming=text), now, ""
        except UserError as err:  # a model, store or checkpoint that cannot be loaded, said in one line
            raise gr.Error(str(err)) from None

    def on_send(values: dict, request: gr.Request):
        current_user(settings, request)
        conv, text = values[conversation] or Conversation(), values[message]
        if not text.strip():
            raise gr.Error("write a message first")
        picked = chosen(values)  # before the message is added: a refused setting leaves no turn behind
        if not conv.turns:
            conv.system = values[
                system
            ]  # the conversation's own: a changed system prompt applies after Clear
        conv.turns.append(Turn(text.strip()))
        yield conv.chatbot(streaming=""), conv, ""
        yield from streamed(conv, len(conv.turns) - 1, picked)

    def on_regenerate(values: dict, request: gr.Request):
        current_user(settings, request)
        conv = values[conversation]
        if conv is None or not conv.turns:
            raise gr.Error("nothing to regenerate yet")
        yield from streamed(conv, len(conv.turns) - 1, chosen(values))

    def on_edit(values: dict, edit: gr.EditData, request: gr.Request):
        current_user(settings, request)
        conv = values[conversation] or Conversation()
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        if index % 2 or index // 2 >= len(conv.turns):
            raise gr.Error("only your own messages can be edited")
        picked = chosen(values)
        del conv.turns[index // 2 + 1 :]
        conv.turns[index // 2] = Turn(str(edit.value).strip())
        yield from streamed(conv, index // 2, picked)

    def on_clear(request: gr.Request):
        current_user(settings, request)
        return [], Conversation(), ""

    def on_like(conv: Conversation | None, like: gr.LikeData, request: gr.Request):
        user = current_user(settings, request)
        conv = conv or Conversation()
        if like.liked not in (True, False):
            return "Rating kept: choose the other thumb to change it."
        index = like.index if isinstance(like.index, int) else like.index[0]
        with shown_as_error():
            return rate(settings, conv, index, bool(like.liked), user.name)

    def on_ranking(conv: Conversation | None, request: gr.Request):
        user = current_user(settings, request)
        conv = conv or Conversation()
        with shown_as_error():
            task_id = send_to_ranking(settings, conv, user.name)
        count = len({a.text for a in conv.turns[-1].answers if a.text.strip()})
        return conv.chatbot(), f"Queued as ranking task {task_id} ({min(count, tasks.MAX_K)} replies)."

    def on_refresh():
        models, reward_models = model_choices(settings)
        return gr.Dropdown(choices=models), gr.Dropdown(choices=reward_models)

    outputs = [chatbot, conversation, message]
    generation = dict(concurrency_id="models", concurrency_limit=2)
    inputs = {conversation, message, *knobs}
    gr.on([send.click, message.submit], on_send, inputs, outputs, api_name="chat_send", **generation)
    regenerate.click(on_regenerate, inputs, outputs, api_name="chat_regenerate", **generation)
    chatbot.retry(on_regenerate, inputs, outputs, api_visibility="private", **generation)
    chatbot.edit(on_edit, inputs, outputs, api_visibility="private", **generation)
    clear.click(on_clear, None, outputs, api_name="chat_clear")
    chatbot.like(on_like, [conversation], status, api_visibility="private")
    to_ranking.click(on_ranking, [conversation], [chatbot, status], api_name="chat_to_ranking")
    refresh.click(on_refresh, None, [model, reward], api_visibility="private")
    return ChatTab(model, reward)


def on_load(app: gr.Blocks, tab: ChatTab, settings: AppSettings) -> None:
    """Fill the model lists when the page opens (models published since the app started included)."""

    def fill():
        models, reward_models = model_choices(settings)
        return (
            gr.Dropdown(choices=models, value=models[0][1] if models else None),
            gr.Dropdown(choices=reward_models, value=NO_REWARD),
        )

    app.load(fill, outputs=[tab.model, tab.reward], api_visibility="private")
