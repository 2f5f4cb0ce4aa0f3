"""Canonical records, the loaders and converters that produce them, and validation with file:line errors.

Every stage reads one of three record kinds (DESIGN.md):

    conversation  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   SFT
    comparison    {"prompt": [messages], "completions": [str, ...], "ranks": [int, ...]}       reward model
    prompt        {"prompt": [messages]}                                                     PPO, eval

Message order: an optional system message first, then user and assistant turns alternating from a
user turn. A conversation ends with an assistant turn; a prompt ends with a user turn. A comparison
holds K >= 2 completions of one prompt; the lower rank is better and equal ranks are a tie. Extra keys
on a record ("id", "source", ...) are kept.

`load_records` reads a file (.jsonl, .json, .parquet, gzipped or not) or a Hub dataset, converts each
source record (HH-RLHF, TRL preference, ShareGPT, Alpaca, OpenAssistant trees, or canonical) into the
requested kind and validates it. A bad record raises `DataError` ("file:line: field: message") or, with
skip_invalid=True, is dropped and reported. Problems with the whole file (empty, truncated gzip,
unreadable Parquet, unknown format) always raise: skipping them would silently lose data.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

Kind = Literal["conversation", "comparison", "prompt"]
KINDS: tuple[Kind, ...] = ("conversation", "comparison", "prompt")
FORMATS = ("canonical", "hh-rlhf", "trl", "sharegpt", "alpaca", "oasst", "mt-bench")
ROLES = ("system", "user", "assistant")
MEMORY = "<memory>"  # the file name of a record that did not come from a file


class DataError(UserError, ValueError):
    """One bad record, or an unreadable file (line None): str(err) is "file:line: field: message".

    `field` names the record field (a JSON path such as "messages[2].content"), or in angle brackets
    what failed before there was a record: <json>, <encoding>, <gzip>, <parquet>, <file>, <hub>,
    <record> (not a JSON object), <format>.
    """

    def __init__(self, file: str | Path, line: int | None, field: str, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        where = self.file if line is None else f"{self.file}:{line}"
        super().__init__(f"{where}: {field}: {message}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, int | None, str, str]]:
        # ValueError pickles as cls(*args); rebuild from the parts so errors cross process boundaries.
        return (DataError, (self.file, self.line, self.field, self.message))

    def at(self, file: str | Path, line: int | None) -> DataError:
        """The same problem, located: converters and validators raise without knowing the file."""
        return DataError(file, line, self.field, self.message)


def _problem(field: str, message: str) -> DataError:
    return DataError(MEMORY, None, field, message)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- validation --------------------------------------------------------------------------------


def validate_conversation(record: Any, *, file: str | Path = MEMORY, line: int | None = None) -> dict:
    """Return a checked copy of a conversation record, or raise DataError naming the bad field."""
    try:
        return _conversation(record)
    except DataError as err:
        raise err.at(file, line) from None


def validate_comparison(record: Any, *, file: str | Path = MEMORY, line: int | None = None) -> dict:
    """Return a checked copy of a ranked comparison (a string prompt becomes one user turn)."""
    try:
        return _comparison(record)
    except DataError as err:
        raise err.at(file, line) from None


def validate_prompt(record: Any, *, file: str | Path = MEMORY, line: int | None = None) -> dict:
    """Return a checked copy of a prompt record (a string prompt becomes one user turn)."""
    try:
        return _prompt(record)
    except DataError as err:
        raise err.at(file, line) from None


def _object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _problem("<record>", f"expected a JSON object, got {_type(record)}")
    return record


def _required(record: dict, key: str) -> Any:
    if key not in record:
        raise _problem(key, "missing")
    return record[key]


def _conversation(record: Any) -> dict:
    record = _object(record)
    messages = _messages(_required(record, "messages"), "messages", last="assistant")
    return {**record, "messages": messages}


def _prompt(record: Any) -> dict:
    record = _object(record)
    return {**record, "prompt": _prompt_messages(_required(record, "prompt"))}


def _comparison(record: Any) -> dict:
    record = _object(record)
    prompt = _prompt_messages(_required(record, "prompt"))
    completions = _required(record, "completions")
    ranks = _required(record, "ranks")
    if not isinstance(completions, list):
        raise _problem("completions", f"expected a list of strings, got {_type(completions)}")
    if len(completions) < 2:
        raise _problem("completions", f"K={len(completions)}: a comparison needs at least 2 completions")
    for i, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise _problem(f"completions[{i}]", f"expected a string, got {_type(completion)}")
        if not completion.strip():
            raise _problem(f"completions[{i}]", "empty completion")
    if not isinstance(ranks, list):
        raise _problem("ranks", f"expected a list of integers, got {_type(ranks)}")
    if len(ranks) != len(completions):
        raise _problem("ranks", f"{len(ranks)} ranks for {len(completions)} completions")
    for i, rank in enumerate(ranks):
        # bool is an int subclass, and 1.0 from a float column would hide a unit mix-up: both refused.
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise _problem(f"ranks[{i}]", f"not an integer: {rank!r}")
        if rank < 0:
            # -1 is a common "unranked" sentinel; read as a rank it would become the best reply.
            raise _problem(f"ranks[{i}]", f"negative rank {rank}: ranks count up from 0 (best)")
    return {**record, "prompt": prompt, "completions": list(completions), "ranks": list(ranks)}


def _prompt_messages(value: Any, field: str = "prompt") -> list[dict]:
    # TRL's prompt-only records carry the prompt as a bare string: that is one user turn.
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    return _messages(value, field, last="user")


def _messages(value: Any, field: str, *, last: str | None) -> list[dict]:
    """Check each message and the turn order; `last` is the role the list must end with (None: any)."""
    if not isinstance(value, list):
        raise _problem(field, f"expected a list of messages, got {_type(value)}")
    if not value:
        raise _problem(field, "no messages")
    messages = [_message(message, f"{field}[{i}]") for i, message in enumerate(value)]
    _check_order(messages, field)
    end = messages[-1]["role"]
    if last is not None and end != last:
        article = "an" if last == "assistant" else "a"
        raise _problem(
            f"{field}[{len(messages) - 1}].role", f"must end with {article} {last} turn, got {end}"
        )
    return messages


def _message(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise _problem(field, f"expected a message object, got {_type(value)}")
    for key in ("role", "content"):
        if key not in value:
            raise _problem(f"{field}.{key}", "missing")
    role, content = value["role"], value["content"]
    if role not in ROLES:
        raise _problem(f"{field}.role", f"unknown role {role!r} (expected system, user or assistant)")
    if not isinstance(content, str):
        raise _problem(f"{field}.content", f"expected a string, got {_type(content)}")
    if not content.strip():
        raise _problem(f"{field}.content", "empty content")
    return dict(value)


def _check_order(messages: list[dict], field: str) -> None:
    """Optional system message first, then user/assistant alternating, starting with user."""
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise _problem(field, "only a system message: no user turn")
    expected = "user"
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role == "system":
            raise _problem(f"{field}[{i}].role", "a system message is allowed only as the first message")
        if role != expected:
            if i == start:
                raise _problem(f"{field}[{i}].role", f"the first turn must be a user turn, got {role}")
            raise _problem(f"{field}[{i}].role", f"two {role} turns in a row")
        expected = "assistant" if role == "user" else "user"


# --- converters from public formats ------------------------------------------------------------


def _string(record: dict, key: str) -> str:
    value = _required(record, key)
    if not isinstance(value, str):
        raise _problem(key, f"expected a string, got {_type(value)}")
    return value


def _keep_id(source: dict, record: dict) -> dict:
    """Carry the source record's "id" so a converted record can be traced back."""
    return {"id": source["id"], **record} if "id" in source else record


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_REPLY = "\n\nAssistant:"
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def from_hh_rlhf(record: Any) -> dict:
    """Anthropic HH-RLHF {"chosen", "rejected"} transcripts -> a K=2 comparison (chosen ranked 0).

    The prompt is the shared transcript up to the reply both transcripts answer with; each completion
    is the rest of its transcript after that "\\n\\nAssistant:", stripped.
    """
    record = _object(record)
    chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
    cut = _hh_prompt_end(chosen, rejected)
    reply = cut + len(_HH_REPLY)
    comparison = {
        "prompt": _hh_turns(chosen[:cut]),
        "completions": [chosen[reply:].strip(), rejected[reply:].strip()],
        "ranks": [0, 1],
    }
    return _keep_id(record, comparison)


def _hh_prompt_end(chosen: str, rejected: str) -> int:
    """The offset of the last "\\n\\nAssistant:" inside the common prefix of both transcripts.

    Normally that is each transcript's last Assistant marker. In a few upstream records (5 of the
    2,312 in harmless-base/test) one reply has further turns glued into it ("...  Human: ...
    \\n\\nAssistant: ..."); splitting each transcript at its own last marker would then give two
    different prompts, while the common prefix gives the prompt both replies answer.
    """
    cut = os.path.commonprefix([chosen, rejected]).rfind(_HH_REPLY)
    if cut < 0:
        raise _problem("chosen", "chosen and rejected share no '\\n\\nAssistant:' turn: no common prompt")
    return cut


def _hh_turns(transcript: str) -> list[dict]:
    parts = _HH_TURN.split(transcript)  # ["", "Human", " text", "Assistant", " text", ...]
    if parts[0].strip():
        raise _problem("chosen", "the transcript does not start with a 'Human:' turn")
    messages: list[dict] = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _HH_ROLES[speaker], text.strip()
        if messages and messages[-1]["role"] == role:
            # Upstream sometimes repeats a speaker ("\n\nAssistant: a\n\nAssistant: b"): one turn.
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def from_trl_preference(record: Any) -> dict:
    """TRL preference {"prompt", "chosen", "rejected"} -> a K=2 comparison (chosen ranked 0).

    Each field may be a string (standard format) or a message list (conversational format). Without
    "prompt" (TRL's implicit-prompt format) chosen and rejected are whole conversations and their
    shared head is the prompt.
    """
    record = _object(record)
    chosen, rejected = _required(record, "chosen"), _required(record, "rejected")
    if "prompt" in record:
        prompt = _trl_prompt(record["prompt"])
    else:
        prompt, chosen, rejected = _trl_split_implicit(chosen, rejected)
    comparison = {
        "prompt": prompt,
        "completions": [_trl_completion(chosen, "chosen"), _trl_completion(rejected, "rejected")],
        "ranks": [0, 1],
    }
    return _keep_id(record, comparison)


def _trl_prompt(value: Any) -> list:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise _problem("prompt", f"expected a string or a list of messages, got {_type(value)}")


def _trl_completion(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _problem(field, f"expected a string or a list of messages, got {_type(value)}")
    if len(value) != 1:
        raise _problem(field, f"expected one assistant message, got {len(value)} messages")
    message = _message(value[0], f"{field}[0]")
    if message["role"] != "assistant":
        raise _problem(f"{field}[0].role", f"expected an assistant message, got {message['role']}")
    return message["content"]


def _trl_split_implicit(chosen: Any, rejected: Any) -> tuple[list, list, list]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise _problem("prompt", "missing (string chosen/rejected transcripts are HH-RLHF: format='hh-rlhf')")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def from_sharegpt(record: Any) -> dict:
    """ShareGPT {"conversations": [{"from", "value"}]} -> a conversation (keeps "id")."""
    record = _object(record)
    turns = _required(record, "conversations")
    if not isinstance(turns, list):
        raise _problem("conversations", f"expected a list of turns, got {_type(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _problem(where, f"expected a turn object, got {_type(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise _problem(f"{where}.{key}", "missing")
        speaker = turn["from"]
        if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:
            raise _problem(
                f"{where}.from", f"unknown speaker {speaker!r} (expected {', '.join(_SHAREGPT_ROLES)})"
            )
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return _keep_id(record, {"messages": messages})


def from_alpaca(record: Any) -> dict:
    """Alpaca {"instruction", "input", "output"} -> a two-turn conversation (keeps "id")."""
    record = _object(record)
    user = _alpaca_user_turn(record)
    return _keep_id(record, {"messages": [user, {"role": "assistant", "content": _string(record, "output")}]})


def _alpaca_user_turn(record: dict) -> dict:
    instruction = _string(record, "instruction")
    extra = record.get("input") or ""  # "input" is optional, and some exports write null for none
    if not isinstance(extra, str):
        raise _problem("input", f"expected a string, got {_type(extra)}")
    content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"role": "user", "content": content}


# OpenAssistant message trees: every message has text, role (prompter|assistant), rank (None when
# unranked), deleted, and replies. A tree line wraps the root message as {"message_tree_id", "prompt"};
# the message file has the root message itself on each line.

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_root(tree: Any) -> tuple[dict, str]:
    """The root message and its JSON path (for field names in errors)."""
    tree = _object(tree)
    root, where = (tree["prompt"], "prompt") if "prompt" in tree else (tree, "")
    if not isinstance(root, dict):
        raise _problem(where or "<record>", f"expected a message object, got {_type(root)}")
    return root, where


def _oasst_turn(message: dict, where: str) -> dict:
    text, role = message.get("text"), message.get("role")
    if not isinstance(role, str) or role not in _OASST_ROLES:
        raise _problem(_join(where, "role"), f"unknown role {role!r} (expected prompter or assistant)")
    if not isinstance(text, str):
        raise _problem(_join(where, "text"), f"expected a string, got {_type(text)}")
    return {"role": _OASST_ROLES[role], "content": text}


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _oasst_replies(message: dict, where: str) -> list[tuple[dict, str]]:
    """Live (not deleted) replies with their JSON paths; a deleted message takes its subtree with it."""
    replies = message.get("replies") or []
    return [
        (reply, f"{_join(where, 'replies')}[{i}]")
        for i, reply in enumerate(replies)
        if isinstance(reply, dict) and not reply.get("deleted")
    ]


def oasst_ranked_groups(tree: Any) -> list[dict]:
    """Every sibling group of >= 2 ranked assistant replies -> a comparison (K = ranked siblings).

    The prompt is the path from the root to the replies' parent. Ranks are kept as given (0 is best),
    in the replies' order; "id" is the parent's message_id.
    """
    groups: list[dict] = []

    def visit(message: dict, where: str, path: list[dict]) -> None:
        replies = _oasst_replies(message, where)
        ranked = [
            reply
            for reply, _ in replies
            if reply.get("role") == "assistant" and reply.get("rank") is not None
        ]
        if message.get("role") == "prompter" and len(ranked) >= 2:
            groups.append(
                {
                    "id": message.get("message_id"),
                    "prompt": path,
                    "completions": [reply.get("text") for reply in ranked],
                    "ranks": [reply["rank"] for reply in ranked],
                }
            )
        for reply, reply_where in replies:
            visit(reply, reply_where, [*path, _oasst_turn(reply, reply_where)])

    root, where = _oasst_root(tree)
    visit(root, where, [_oasst_turn(root, where)])
    return groups


def oasst_dialogues(tree: Any) -> list[dict]:
    """Root-to-leaf dialogues that follow the rank-0 (or only) assistant reply at every prompter turn.

    Every prompter follow-up is its own branch. A dialogue ends at an assistant message that no
    branch continues, so no dialogue is a prefix of another and each ends with an assistant turn;
    "id" is that last message's message_id.
    """
    dialogues: list[dict] = []

    def visit_prompter(message: dict, where: str, path: list[dict]) -> bool:
        best = _oasst_best_reply(message, where)
        if best is None:
            return False
        reply, reply_where = best
        visit_assistant(reply, reply_where, [*path, _oasst_turn(reply, reply_where)])
        return True

    def visit_assistant(message: dict, where: str, path: list[dict]) -> None:
        continued = False
        for reply, reply_where in _oasst_replies(message, where):
            if reply.get("role") == "prompter":
                continued |= visit_prompter(reply, reply_where, [*path, _oasst_turn(reply, reply_where)])
        if not continued:
            dialogues.append({"id": message.get("message_id"), "messages": path})

    root, where = _oasst_root(tree)
    visit_prompter(root, where, [_oasst_turn(root, where)])
    return dialogues


def _oasst_best_reply(message: dict, where: str) -> tuple[dict, str] | None:
    """The only assistant reply, else the one ranked 0; None when the choice is ambiguous or empty."""
    replies = [(r, w) for r, w in _oasst_replies(message, where) if r.get("role") == "assistant"]
    if len(replies) == 1:
        return replies[0]
    return next(((r, w) for r, w in replies if r.get("rank") == 0), None)


def _oasst_root_prompt(tree: Any) -> dict:
    """The tree's first user turn as a prompt record ("id" is the root's message_id)."""
    root, where = _oasst_root(tree)
    return {"id": root.get("message_id"), "prompt": [_oasst_turn(root, where)]}


def from_mt_bench_question(record: Any) -> dict:
    """A FastChat llm_judge question (MT-Bench, Vicuna-bench: `question_id`, `category`, `turns`) as the
    prompt of its first turn; later turns answer a reply this prompt has not had yet."""
    record = _object(record)
    turns = _required(record, "turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
        raise _problem("turns", "expected a list of questions, the first a non-empty string")
    return {"id": record.get("question_id"), "category": record.get("category"),
            "prompt": [{"role": "user", "content": turns[0]}]}  # fmt: skip


def conversation_to_prompt(record: Any) -> dict:
    """The prompt a conversation's final reply answers: its messages up to the last user turn."""
    record = _object(record)
    messages = _messages(_required(record, "messages"), "messages", last=None)
    last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
    rest = {key: value for key, value in record.items() if key != "messages"}
    return {**rest, "prompt": messages[: last_user + 1]}


def _comparison_to_prompt(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ("completions", "ranks")}


def _canonical_to_prompt(record: dict) -> dict:
    record = _object(record)
    return conversation_to_prompt(record) if "messages" in record else _comparison_to_prompt(record)


def _detect_format(record: dict) -> str:
    """Name the source format from one record's keys (format="auto")."""
    keys = set(record)
    if "messages" in keys or "completions" in keys:
        return "canonical"
    if {"chosen", "rejected"} <= keys:
        # String transcripts without a prompt are HH-RLHF; anything else is TRL's preference format.
        return "hh-rlhf" if "prompt" not in keys and isinstance(record["chosen"], str) else "trl"
    if "conversations" in keys:
        return "sharegpt"
    if {"question_id", "turns"} <= keys:
        return "mt-bench"
    if "instruction" in keys:
        return "alpaca"
    if "replies" in keys or isinstance(record.get("prompt"), dict):
        return "oasst"
    if "prompt" in keys:
        return "canonical"
    if {"message_id", "parent_id", "role", "text"} <= keys:
        raise _problem(
            "<format>", "flat OpenAssistant messages (one per row) are not supported: use the trees export"
        )
    raise _problem(
        "<format>", f"cannot tell the format from the keys {sorted(keys)}; pass format=one of {FORMATS}"
    )


def _default_kind(format: str, record: dict) -> Kind:
    if format == "canonical":
        if "messages" in record:
            return "conversation"
        return "comparison" if "completions" in record else "prompt"
    if format == "mt-bench":
        return "prompt"
    return "conversation" if format in ("sharegpt", "alpaca") else "comparison"


# (format, kind) -> a function from one source record to canonical records (validated afterwards).
_CONVERTERS: dict[tuple[str, str], Callable[[dict], list[dict]]] = {
    ("canonical", "conversation"): lambda record: [record],
    ("canonical", "comparison"): lambda record: [record],
    ("canonical", "prompt"): lambda record: [_canonical_to_prompt(record)],
    ("hh-rlhf", "comparison"): lambda record: [from_hh_rlhf(record)],
    ("hh-rlhf", "prompt"): lambda record: [_comparison_to_prompt(from_hh_rlhf(record))],
    ("trl", "comparison"): lambda record: [from_trl_preference(record)],
    ("trl", "prompt"): lambda record: [_comparison_to_prompt(from_trl_preference(record))],
    ("sharegpt", "conversation"): lambda record: [from_sharegpt(record)],
    ("sharegpt", "prompt"): lambda record: [conversation_to_prompt(from_sharegpt(record))],
    ("alpaca", "conversation"): lambda record: [from_alpaca(record)],
    ("alpaca", "prompt"): lambda record: [_keep_id(record, {"prompt": [_alpaca_user_turn(record)]})],
    ("oasst", "comparison"): oasst_ranked_groups,
    ("oasst", "conversation"): oasst_dialogues,
    ("oasst", "prompt"): lambda record: [_oasst_root_prompt(record)],
    ("mt-bench", "prompt"): lambda record: [from_mt_bench_question(record)],
}

_VALIDATORS: dict[str, Callable[[Any], dict]] = {
    "conversation": _conversation,
    "comparison": _comparison,
    "prompt": _prompt,
}


# --- reading files and the Hub -----------------------------------------------------------------

Row = tuple[int, Any]  # (1-based line, or list index + 1; the parsed value or a per-line DataError)

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz")
_HUB_ID = re.compile(r"^(?:hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)$")


def _rows(source: str, split: str) -> Iterator[Row]:
    path = Path(source)
    if path.is_file():
        return _file_rows(path)
    if path.is_dir():
        raise DataError(source, None, "<file>", "is a directory: pass a .jsonl, .json or .parquet file")
    hub = _HUB_ID.match(source)
    # "data/train.jsonl" also looks like org/name; a data-file suffix means a missing local file.
    if hub and (source.startswith("hub:") or not source.lower().endswith(_DATA_SUFFIXES)):
        return _hub_rows(source, hub.group(1), split)
    raise DataError(source, None, "<file>", "no such file")


def _file_rows(path: Path) -> Iterator[Row]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _parquet_rows(path)
    compressed = name.endswith(".gz")
    stem = name.removesuffix(".gz")
    if not stem.endswith((".jsonl", ".json")):
        raise DataError(
            path,
            None,
            "<file>",
            "unknown file type: expected .jsonl, .json or .parquet (or .jsonl.gz, .json.gz)",
        )
    data = _gunzip(path) if compressed else path.read_bytes()
    if not data.strip():
        raise DataError(path, None, "<file>", "the file is empty: no records")
    return _jsonl_rows(path, data) if stem.endswith(".jsonl") else _json_rows(path, data)


def _gunzip(path: Path) -> bytes:
    """Decompress the whole file first, so a truncated archive fails as a file before any record."""
    rest, out = path.read_bytes(), b""
    while rest:  # a .gz may hold several concatenated members
        stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += stream.decompress(rest)
        except zlib.error as err:
            raise DataError(
                path, out.count(b"\n") + 1, "<gzip>", f"not a readable gzip file ({err})"
            ) from None
        if not stream.eof:
            line = out.count(b"\n") + 1
            raise DataError(path, line, "<gzip>", "truncated gzip file: the data stops inside this line")
        rest = stream.unused_data.lstrip(b"\0")  # gzip allows zero padding after the last member
    return out


def _jsonl_rows(path: Path, data: bytes) -> Iterator[Row]:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark from some Windows editors
    for line, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            yield line, _parse_line(path, line, raw)


def _parse_line(path: Path, line: int, raw: bytes) -> Any:
    """One JSON line's value, or a DataError for that line (so skip_invalid can move on)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(
            path, line, "<encoding>", f"not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(path, line, "<json>", f"not valid JSON: {err.msg} (column {err.colno})")


def _json_rows(path: Path, data: bytes) -> Iterator[Row]:
    """A JSON list, or {"data": [...]}; a .json file holding JSON lines (Dataset.to_json writes those) too."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(path, line, "<encoding>", f"not UTF-8: byte 0x{data[err.start]:02x}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            return _jsonl_rows(path, data)
        raise DataError(
            path, err.lineno, "<json>", f"not valid JSON: {err.msg} (column {err.colno})"
        ) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        found = f"an object with keys {sorted(document)}" if isinstance(document, dict) else _type(document)
        raise DataError(path, None, "<file>", f'expected a list of records or {{"data": [...]}}, got {found}')
    if not document:
        raise DataError(path, None, "<file>", "the file is empty: no records")
    return enumerate(document, 1)


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, None, "<parquet>", f"not a readable Parquet file ({err})") from None
    if table.num_rows == 0:
        raise DataError(path, None, "<file>", "the file is empty: no records")
    return enumerate(table.to_pylist(), 1)


def _hub_rows(source: str, name: str, split: str) -> Iterator[Row]:
    import datasets  # deferred: importing it takes seconds and only Hub sources need it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises a dozen types (ConnectionError, DatasetNotFoundError, ...)
        raise DataError(
            source,
            None,
            "<hub>",
            f"could not load {name!r} (split {split!r}) from the Hugging Face Hub: the Hub could not be reached "
            f"or has no such dataset ({type(err).__name__}: {err}). Pass a local .jsonl, .json or .parquet file instead",
        ) from None
    return enumerate(dataset, 1)


# --- loading -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    records: list[dict]
    """Validated canonical records of the requested kind."""
    dropped: int
    """Records dropped as invalid (skip_invalid=True); always len(problems)."""
    problems: list[DataError]
    """One located error per dropped record, in file order."""
    source: str
    """The path or Hub id that was read."""
    format: str
    """The source format, detected when "auto" was asked for."""


def load_records(
    source: str | Path,
    kind: Kind,
    *,
    format: str = "auto",
    skip_invalid: bool = False,
    split: str = "train",
    limit: int | None = None,
) -> LoadResult:
    """Read `source` (a file or a Hub dataset id) as canonical records of `kind`.

    With skip_invalid=False the first bad record raises DataError; with True bad records are
    dropped, counted and kept in `problems`. `limit` stops after that many records.
    """
    result, _ = _load(source, kind, format=format, skip_invalid=skip_invalid, split=split, limit=limit)
    return result


def _load(
    source: str | Path,
    kind: Kind | None,
    *,
    format: str,
    skip_invalid: bool,
    split: str,
    limit: int | None,
) -> tuple[LoadResult, Kind | None]:
    """load_records, also inferring the kind from the first record when `kind` is None."""
    name = str(source)
    if format != "auto" and format not in FORMATS:
        raise DataError(
            name, None, "<format>", f"unknown format {format!r}; expected auto or one of {FORMATS}"
        )
    if kind is not None and kind not in KINDS:
        raise DataError(name, None, "<format>", f"unknown kind {kind!r}; expected one of {KINDS}")
    result = LoadResult(records=[], dropped=0, problems=[], source=name, format=format)
    convert: Callable[[dict], list[dict]] | None = None

    def reject(err: DataError, line: int) -> None:
        located = err.at(name, line)
        if not skip_invalid:
            raise located
        result.dropped += 1
        result.problems.append(located)

    for line, row in _rows(name, split):
        if limit is not None and len(result.records) >= limit:
            break
        if isinstance(row, DataError):
            reject(row, line)
            continue
        if not isinstance(row, dict):
            reject(_problem("<record>", f"expected a JSON object, got {_type(row)}"), line)
            continue
        if convert is None:  # the first record decides the format and, when not given, the kind
            try:
                result.format, kind, convert = _plan(format, kind, row)
            except DataError as err:
                raise err.at(name, line) from None
        try:
            converted = convert(row)
        except DataError as err:
            reject(err, line)
            continue
        for record in converted:
            try:
                result.records.append(_VALIDATORS[kind](record))
            except DataError as err:
                reject(err, line)
    if limit is not None:
        del result.records[limit:]
    return result, kind


def _plan(format: str, kind: Kind | None, record: dict) -> tuple[str, Kind, Callable[[dict], list[dict]]]:
    format = _detect_format(record) if format == "auto" else format
    kind = kind or _default_kind(format, record)
    convert = _CONVERTERS.get((format, kind))
    if convert is None:
        allowed = [k for f, k in _CONVERTERS if f == format]
        raise _problem(
            "<format>", f"{format} records cannot be loaded as {kind}; they load as {' or '.join(allowed)}"
        )
    return format, kind, convert


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8); gzipped when the name ends in .gz."""
    path = Path(path)
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    # mtime=0 keeps the bytes a function of the records, so artifact checksums are reproducible.
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data)


# --- inspection --------------------------------------------------------------------------------

PERCENTILES = (50, 90, 99)


@dataclass
class InspectReport:
    source: str
    format: str
    kind: Kind | None
    """None only when no record could be read to infer it from."""
    records: int
    dropped: int
    k_distribution: dict[int, int]
    """Comparisons: K (completions per record) -> number of records."""
    turns_distribution: dict[int, int]
    """Conversations: turns (user and assistant messages) -> number of records."""
    lengths: dict[str, dict[str, int]]
    """What was measured ("prompt", "completion", "conversation") -> {"p50", "p90", "p99", "max"}."""
    length_unit: str
    """"tokens" with a tokenizer, else "characters"."""
    problems: list[DataError] = field(default_factory=list)
    """The first max_problems problems; `dropped` counts them all."""

    def render(self) -> str:
        lines = [
            f"source:  {self.source}",
            f"format:  {self.format}",
            f"kind:    {self.kind or 'unknown (no readable record)'}",
            f"records: {self.records} read, {self.dropped} dropped",
        ]
        if self.k_distribution:
            lines.append("K distribution (completions per comparison):")
            lines += [f"  K={k}: {n}" for k, n in sorted(self.k_distribution.items())]
        if self.turns_distribution:
            lines.append("turns distribution (user + assistant messages per conversation):")
            lines += [f"  {turns} turns: {n}" for turns, n in sorted(self.turns_distribution.items())]
        if self.lengths:
            unit = "tokens" if self.length_unit == "tokens" else "characters (no tokenizer given)"
            lines.append(f"lengths in {unit}:")
            for what, stats in self.lengths.items():
                lines.append(f"  {what:<12} " + "  ".join(f"{name} {value}" for name, value in stats.items()))
        if self.problems:
            lines.append(f"problems (first {len(self.problems)} of {self.dropped}):")
            lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def inspect_file(
    source: str | Path,
    kind: Kind | None = None,
    *,
    format: str = "auto",
    tokenizer: Any = None,
    skip_invalid: bool = True,
    max_problems: int = 10,
) -> InspectReport:
    """Load `source` and summarise it: counts, K / turn distributions, length percentiles, problems.

    `tokenizer` is a Hugging Face tokenizer (called as tokenizer(texts, add_special_tokens=False));
    lengths count message contents only, without a chat template.
    """
    result, kind = _load(source, kind, format=format, skip_invalid=skip_invalid, split="train", limit=None)
    records = result.records
    texts = _length_texts(records, kind)
    return InspectReport(
        source=result.source,
        format=result.format,
        kind=kind,
        records=len(records),
        dropped=result.dropped,
        k_distribution=dict(sorted(Counter(len(r["completions"]) for r in records).items()))
        if kind == "comparison"
        else {},
        turns_distribution=dict(sorted(Counter(_turns(r["messages"]) for r in records).items()))
        if kind == "conversation"
        else {},
        lengths={what: _percentiles(_lengths(groups, tokenizer)) for what, groups in texts.items() if groups},
        length_unit="tokens" if tokenizer is not None else "characters",
        problems=result.problems[:max_problems],
    )


def _turns(messages: list[dict]) -> int:
    return sum(message["role"] != "system" for message in messages)


def _length_texts(records: list[dict], kind: Kind | None) -> dict[str, list[list[str]]]:
    """What to measure -> one list of texts per measured item (an item's length is their sum)."""
    if kind == "conversation":
        return {"conversation": [[m["content"] for m in r["messages"]] for r in records]}
    prompts = [[m["content"] for m in r["prompt"]] for r in records]
    if kind == "comparison":
        return {"prompt": prompts, "completion": [[c] for r in records for c in r["completions"]]}
    return {"prompt": prompts}


def _lengths(groups: list[list[str]], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [sum(len(text) for text in group) for group in groups]
    flat = [text for group in groups for text in group]
    counts = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
    return [sum(next(counts) for _ in group) for group in groups]


def _percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: each is a length that actually occurs."""
    ordered = sorted(values)
    stats = {f"p{p}": ordered[math.ceil(p / 100 * len(ordered)) - 1] for p in PERCENTILES}
    return {**stats, "max": ordered[-1]}
