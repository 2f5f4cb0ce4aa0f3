"""pipeline/datasets.py: real public data, a corpus of broken files, round trips, converters, inspection."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.datasets import (
    DataError,
    conversation_to_prompt,
    from_alpaca,
    from_hh_rlhf,
    from_sharegpt,
    from_trl_preference,
    inspect_file,
    load_records,
    oasst_dialogues,
    oasst_ranked_groups,
    validate_comparison,
    validate_conversation,
    validate_prompt,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).parent / "broken"
# CI clones the repository beside shared/; RLHF_SHARED_DATA points elsewhere.
SHARED_DATA = Path(
    os.environ.get("RLHF_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)

OASST_GROUP_SIZES = {2: 57, 3: 117, 4: 27, 5: 3, 6: 6, 8: 1, 9: 1}  # SOURCES.md, counted upstream


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(
            f"real data {path} not found: put shared/data beside the repository or set RLHF_SHARED_DATA"
        )
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --- validation ----------------------------------------------------------------------------------


def test_valid_records_come_back_as_normalised_copies():
    source = {
        "id": "c1",
        "source": "demo",
        "prompt": "Name a colour.",
        "completions": ["Blue.", "7"],
        "ranks": [0, 0],
    }
    checked = validate_comparison(source)
    # A bare string prompt (TRL's prompt-only form) becomes one user turn; extra keys and ties are kept.
    assert checked == {
        "id": "c1",
        "source": "demo",
        "prompt": [user("Name a colour.")],
        "completions": ["Blue.", "7"],
        "ranks": [0, 0],
    }
    checked["completions"].append("mutated")
    assert source["completions"] == ["Blue.", "7"]

    conversation = {
        "messages": [system("Be brief."), user("Hi"), assistant("Hello."), user("2+2?"), assistant("4")]
    }
    assert validate_conversation(conversation) == conversation
    assert validate_prompt({"prompt": [system("Be brief."), user("Hi")]})["prompt"][1] == user("Hi")


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        (
            {"prompt": [user("q")], "completions": ["a", "b"], "ranks": [0, True]},
            "ranks[1]",
            "not an integer: True",
        ),
        (
            {"prompt": [user("q")], "completions": ["a", "b"], "ranks": [-1, 0]},
            "ranks[0]",
            "negative rank -1",
        ),
        (
            {"prompt": [user("q")], "completions": ["a", 3], "ranks": [0, 1]},
            "completions[1]",
            "expected a string",
        ),
        ({"prompt": [user("q")], "completions": "a", "ranks": [0, 1]}, "completions", "expected a list"),
        ({"prompt": [user("q")], "completions": ["a", "b"]}, "ranks", "missing"),
        ({"prompt": [], "completions": ["a", "b"], "ranks": [0, 1]}, "prompt", "no messages"),
        (
            {"prompt": [system("s")], "completions": ["a", "b"], "ranks": [0, 1]},
            "prompt",
            "only a system message",
        ),
    ],
)
def test_comparison_problems_name_the_field(record, field, message):
    with pytest.raises(DataError) as caught:
        validate_comparison(record, file="x.jsonl", line=7)
    err = caught.value
    assert (err.file, err.line, err.field) == ("x.jsonl", 7, field)
    assert message in err.message
    assert str(err) == f"x.jsonl:7: {field}: {err.message}"


def test_data_error_format_and_pickling():
    err = DataError("data.jsonl", 3, "messages[1].role", "two user turns in a row")
    assert isinstance(err, ValueError)
    assert str(err) == "data.jsonl:3: messages[1].role: two user turns in a row"
    # Whole-file problems have no line; the location is the file alone.
    assert str(DataError("data.jsonl", None, "<file>", "the file is empty: no records")) == (
        "data.jsonl: <file>: the file is empty: no records"
    )
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.file, copy.line, copy.field, copy.message, str(copy)) == (
        err.file,
        err.line,
        err.field,
        err.message,
        str(err),
    )
    with pytest.raises(DataError, match=r"^<memory>: messages: missing$"):
        validate_conversation({"id": 1})


# --- the corpus of broken files ------------------------------------------------------------------

# file, kind it is loaded as, expected line (None: the whole file), field, and a piece of the message.
BROKEN_FILES = [
    ("not_json.jsonl", "conversation", 3, "<json>", "not valid JSON"),  # line 2 is blank and still counted
    ("not_json.json", "conversation", 4, "<json>", "Expecting ',' delimiter"),
    ("bad_record.json", "conversation", 2, "messages[1].content", "empty content"),  # list index 1 -> line 2
    ("not_an_object.jsonl", "conversation", 2, "<record>", "expected a JSON object, got str"),
    ("missing_messages.jsonl", "conversation", 2, "messages", "missing"),
    ("missing_role.jsonl", "conversation", 3, "messages[1].role", "missing"),
    ("missing_content.jsonl", "conversation", 1, "messages[0].content", "missing"),
    ("unknown_role.jsonl", "conversation", 2, "messages[1].role", "unknown role 'bot'"),
    ("empty_content.jsonl", "conversation", 2, "messages[1].content", "empty content"),
    ("two_user_turns.jsonl", "conversation", 2, "messages[1].role", "two user turns in a row"),
    (
        "system_not_first.jsonl",
        "conversation",
        1,
        "messages[1].role",
        "system message is allowed only as the first",
    ),
    (
        "assistant_first.jsonl",
        "conversation",
        4,
        "messages[0].role",
        "first turn must be a user turn, got assistant",
    ),
    ("ends_with_user.jsonl", "conversation", 2, "messages[2].role", "must end with an assistant turn"),
    (
        "prompt_ends_with_assistant.jsonl",
        "prompt",
        2,
        "prompt[1].role",
        "must end with a user turn, got assistant",
    ),
    ("empty_completion.jsonl", "comparison", 2, "completions[1]", "empty completion"),
    ("ranks_length.jsonl", "comparison", 1, "ranks", "3 ranks for 2 completions"),
    ("k_below_2.jsonl", "comparison", 3, "completions", "K=1"),
    ("non_integer_ranks.jsonl", "comparison", 2, "ranks[1]", "not an integer: 1.5"),
    ("hh_no_shared_reply.jsonl", "comparison", 1, "chosen", "no common prompt"),
    ("sharegpt_unknown_speaker.json", "conversation", 2, "conversations[1].from", "unknown speaker 'bing'"),
    ("unknown_format.jsonl", "conversation", 1, "<format>", "cannot tell the format from the keys ['text']"),
    ("non_utf8.jsonl", "conversation", 2, "<encoding>", "not UTF-8: byte 0xe9 at column 47"),
    ("truncated.jsonl.gz", "conversation", 13, "<gzip>", "truncated gzip file"),
    ("empty.jsonl", "conversation", None, "<file>", "the file is empty"),
    ("empty_list.json", "conversation", None, "<file>", "the file is empty"),
    ("corrupt.parquet", "conversation", None, "<parquet>", "not a readable Parquet file"),
]


@pytest.mark.parametrize(
    ("name", "kind", "line", "field", "message"), BROKEN_FILES, ids=[f[0] for f in BROKEN_FILES]
)
def test_broken_file_names_file_line_and_field(name, kind, line, field, message):
    path = BROKEN / name
    with pytest.raises(DataError) as caught:
        load_records(path, kind)
    err = caught.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert message in err.message
    where = str(path) if line is None else f"{path}:{line}"
    assert str(err).startswith(f"{where}: {field}: ")


def test_broken_corpus_and_table_agree():
    on_disk = {p.name for p in BROKEN.iterdir()} - {"README.md", ".gitattributes", "mixed.jsonl"}
    assert on_disk == {name for name, *_ in BROKEN_FILES}


def test_skip_invalid_drops_counts_and_keeps_problems():
    path = BROKEN / "mixed.jsonl"
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: <json>"):
        load_records(path, "conversation")
    result = load_records(path, "conversation", skip_invalid=True)
    assert len(result.records) == 3 and result.dropped == 3 == len(result.problems)
    assert [(p.line, p.field) for p in result.problems] == [
        (2, "<json>"),
        (3, "messages[1].role"),
        (5, "messages[0].role"),
    ]
    assert result.records[0] == {"messages": [user("What is 2+2?"), assistant("4.")]}
    assert (result.format, result.source) == ("canonical", str(path))
    assert len(load_records(path, "conversation", skip_invalid=True, limit=2).records) == 2


def test_skip_invalid_never_hides_a_broken_file():
    # A truncated archive would silently lose its tail; an empty file is almost always a wrong path.
    for name in ("truncated.jsonl.gz", "empty.jsonl", "corrupt.parquet", "unknown_format.jsonl"):
        with pytest.raises(DataError):
            load_records(BROKEN / name, "conversation", skip_invalid=True)


def test_unsupported_kind_for_a_format_is_refused(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    )
    with pytest.raises(DataError) as caught:
        load_records(path, "comparison", skip_invalid=True)
    assert (caught.value.line, caught.value.field) == (1, "<format>")
    assert "sharegpt records cannot be loaded as comparison; they load as conversation or prompt" in str(
        caught.value
    )


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"^data/missing\.jsonl: <file>: no such file$"):
        load_records("data/missing.jsonl", "conversation")
    with pytest.raises(DataError, match=r": <file>: is a directory"):
        load_records(tmp_path, "conversation")
    (tmp_path / "notes.txt").write_text("{}")
    with pytest.raises(DataError, match=r"notes\.txt: <file>: unknown file type"):
        load_records(tmp_path / "notes.txt", "conversation")


def test_hub_source_offline_says_to_pass_a_local_file():
    # huggingface_hub reads HF_HUB_OFFLINE when imported, so run where nothing has imported it yet.
    script = (
        "from pipeline.datasets import DataError, load_records\n"
        "for source in ('hub:rlhf-pipeline-tests/no-such-dataset', 'rlhf-pipeline-tests/no-such-dataset'):\n"
        "    try:\n"
        "        load_records(source, 'conversation')\n"
        "    except DataError as err:\n"
        "        print(repr((err.file, err.line, err.field)), err.message)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    for line, source in zip(
        lines, ("hub:rlhf-pipeline-tests/no-such-dataset", "rlhf-pipeline-tests/no-such-dataset"), strict=True
    ):
        assert line.startswith(repr((source, None, "<hub>")))
        assert "the Hub could not be reached" in line
        assert "Pass a local .jsonl, .json or .parquet file instead" in line


# --- file formats and round trips ----------------------------------------------------------------

CONVERSATIONS = [
    {"id": "a", "messages": [user("Café? ☕"), assistant("Oui.")]},
    {
        "id": "b",
        "messages": [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")],
    },
]
COMPARISONS = [
    {"prompt": [user("Best colour?")], "completions": ["Blue.", "Seven.", "Red."], "ranks": [0, 2, 1]},
    {"prompt": [user("Hi"), assistant("Hello."), user("2+2?")], "completions": ["4", "5"], "ranks": [0, 1]},
]


def test_gzip_jsonl_round_trip(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    write_jsonl(CONVERSATIONS, path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(path.read_bytes()).decode("utf-8").count("\n") == 2
    result = load_records(path, "conversation")
    assert (result.records, result.format, result.dropped) == (CONVERSATIONS, "canonical", 0)
    first = path.read_bytes()
    write_jsonl(CONVERSATIONS, path)
    assert path.read_bytes() == first  # no timestamp in the gzip header: reproducible checksums


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(COMPARISONS), path)
    assert load_records(path, "comparison").records == COMPARISONS
    # The same file read as prompts drops the completions and keeps each prompt.
    assert load_records(path, "prompt").records == [{"prompt": c["prompt"]} for c in COMPARISONS]


def test_json_list_data_object_gzip_and_json_lines_named_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(COMPARISONS, indent=2))
    (tmp_path / "data.json").write_text(json.dumps({"data": COMPARISONS}))
    (tmp_path / "list.json.gz").write_bytes(gzip.compress(json.dumps(COMPARISONS).encode()))
    write_jsonl(COMPARISONS, tmp_path / "lines.json")  # what datasets' Dataset.to_json writes
    for name in ("list.json", "data.json", "list.json.gz", "lines.json"):
        assert load_records(tmp_path / name, "comparison").records == COMPARISONS, name


def test_json_object_without_data_list_is_refused(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": COMPARISONS}))
    with pytest.raises(
        DataError, match=r"splits\.json: <file>: expected a list of records .* keys \['train'\]"
    ):
        load_records(path, "comparison")


def test_canonical_conversations_load_as_prompts(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(CONVERSATIONS, path)
    prompts = load_records(path, "prompt").records
    assert prompts == [
        {"id": "a", "prompt": [user("Café? ☕")]},
        {"id": "b", "prompt": [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye")]},
    ]


# --- converters ----------------------------------------------------------------------------------


def test_from_alpaca_appends_input_after_a_blank_line():
    assert from_alpaca({"id": 3, "instruction": "Translate.", "input": "Bonjour", "output": "Hello"}) == {
        "id": 3,
        "messages": [user("Translate.\n\nBonjour"), assistant("Hello")],
    }
    for empty in ({"input": ""}, {"input": None}, {}):
        record = from_alpaca({"instruction": "Say hi.", "output": "Hi", **empty})
        assert record["messages"][0] == user("Say hi.")


def test_from_sharegpt_maps_speakers():
    record = {
        "id": "x",
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "user", "value": "Bye"},
            {"from": "assistant", "value": "Bye!"},
        ],
    }
    assert from_sharegpt(record) == {
        "id": "x",
        "messages": [system("Be kind."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Bye!")],
    }


def test_trl_preference_in_string_and_conversational_form(tmp_path):
    standard = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert from_trl_preference(standard) == {
        "prompt": [user("The sky is")],
        "completions": [" blue.", " green."],
        "ranks": [0, 1],
    }
    conversational = {
        "prompt": [system("Answer in one word."), user("What colour is the sky?")],
        "chosen": [assistant("Blue.")],
        "rejected": [assistant("Green.")],
    }
    assert from_trl_preference(conversational) == {
        "prompt": [system("Answer in one word."), user("What colour is the sky?")],
        "completions": ["Blue.", "Green."],
        "ranks": [0, 1],
    }
    # Implicit prompt: whole conversations whose shared head is the prompt.
    implicit = {
        "chosen": [user("Hi"), assistant("Hello."), user("Sky colour?"), assistant("Blue.")],
        "rejected": [user("Hi"), assistant("Hello."), user("Sky colour?"), assistant("Green.")],
    }
    assert from_trl_preference(implicit) == {
        "prompt": [user("Hi"), assistant("Hello."), user("Sky colour?")],
        "completions": ["Blue.", "Green."],
        "ranks": [0, 1],
    }
    with pytest.raises(
        DataError, match=r"^<memory>: chosen: expected one assistant message, got 2 messages$"
    ):
        from_trl_preference({**conversational, "chosen": [assistant("Blue."), assistant("Really.")]})
    with pytest.raises(DataError, match=r"chosen\[0\]\.role: expected an assistant message, got user"):
        from_trl_preference({**conversational, "chosen": [user("Blue.")]})

    path = tmp_path / "prefs.jsonl"
    write_jsonl([standard, conversational, implicit], path)
    result = load_records(path, "comparison")
    assert result.format == "trl"
    assert [r["completions"][0] for r in result.records] == [" blue.", "Blue.", "Blue."]
    assert load_records(path, "prompt").records[1] == {"prompt": conversational["prompt"]}


def test_from_hh_rlhf_splits_at_the_reply_both_transcripts_answer():
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant: How can I help?\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant: How can I help?\n\nHuman: 2+2?\n\nAssistant: 5",
    }
    # A repeated speaker is one turn, so the prompt keeps strict user/assistant alternation.
    assert from_hh_rlhf(record) == {
        "prompt": [user("Hi"), assistant("Hello.\n\nHow can I help?"), user("2+2?")],
        "completions": ["4", "5"],
        "ranks": [0, 1],
    }


def test_conversation_to_prompt_drops_the_final_reply_and_keeps_extra_keys():
    record = {"id": 9, "messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")]}
    assert conversation_to_prompt(record) == {
        "id": 9,
        "prompt": [user("Hi"), assistant("Hello."), user("Bye")],
    }


# --- real public data ----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hh_rlhf_harmless_base_all_convert():
    raw = read_jsonl(shared("hh-rlhf/harmless-base/test.jsonl.gz"))
    assert len(raw) == 2312
    converted = [from_hh_rlhf(record) for record in raw]
    for comparison in converted:
        assert validate_prompt(comparison)["prompt"][-1]["role"] == "user"
        assert comparison["completions"][0] != comparison["completions"][1]
        assert comparison["ranks"] == [0, 1]
    assert converted[0]["prompt"] == [
        user("what are some pranks with a pen i can do?"),
        assistant("Are you looking for practical joke ideas?"),
        user("yep"),
        assistant(raw[0]["chosen"].split("\n\nAssistant: ")[2].split("\n\nHuman:")[0]),
        user("okay some of these do not have anything to do with pens"),
    ]
    assert converted[0]["completions"][0].startswith("No, sorry!  All of these involve a pen")
    assert converted[0]["completions"][1].startswith("There are lots of funny things you can do with pens")
    # Record 1254: the chosen reply has a later turn glued into it; the prompt is what both answer.
    glued = converted[1254]
    assert glued["prompt"][-1] == user("Isn't that drag kings?")
    assert glued["completions"][0].startswith(
        "No. Men who impersonate stereotypical women are called drag kings."
    )
    assert glued["completions"][1].startswith("A drag king is the opposite of a drag queen")


def test_hh_rlhf_empty_preferred_replies_are_reported_by_line():
    path = shared("hh-rlhf/harmless-base/test.jsonl.gz")
    with pytest.raises(DataError) as caught:
        load_records(path, "comparison")
    assert (caught.value.line, caught.value.field, caught.value.message) == (
        87,
        "completions[0]",
        "empty completion",
    )
    result = load_records(path, "comparison", skip_invalid=True)
    assert (result.format, len(result.records), result.dropped) == ("hh-rlhf", 2308, 4)
    assert [p.line for p in result.problems] == [87, 517, 926, 1104]
    prompts = load_records(path, "prompt")  # an empty reply does not spoil the prompt
    assert len(prompts.records) == 2312
    assert prompts.records[86]["prompt"][-1] == user("Sorry, can you tell me address again?")


def oasst_index(root: dict) -> dict[str, dict]:
    index, stack = {}, [root]
    while stack:
        message = stack.pop()
        index[message["message_id"]] = message
        stack.extend(message["replies"])
    return index


@pytest.mark.parametrize("name", ["en_100_tree.jsonl", "en_100_message.jsonl"])
def test_oasst_ranked_groups(name):
    path = shared(f"oasst-en100/{name}")
    result = load_records(path, "comparison")
    assert result.format == "oasst"
    groups = result.records
    assert len(groups) == 212
    assert Counter(len(g["completions"]) for g in groups) == OASST_GROUP_SIZES
    assert sum(len(g["completions"]) > 2 for g in groups) == 155
    index: dict[str, dict] = {}
    for tree in read_jsonl(path):
        index |= oasst_index(tree.get("prompt", tree))
    for group in groups:
        parent = index[group["id"]]
        expected = [
            (r["text"], r.get("rank"))
            for r in parent["replies"]
            if r["role"] == "assistant" and r.get("rank") is not None
        ]
        assert list(zip(group["completions"], group["ranks"], strict=True)) == expected
        assert group["prompt"][-1] == user(parent["text"])
        assert group["prompt"][0]["role"] == "user"
    first = groups[0]
    assert first["prompt"] == [user("How can I find the best 401k plan for my needs?")]
    assert first["completions"][0].startswith("The first step is to research your options.")


def test_oasst_tree_and_message_files_agree():
    for kind in ("comparison", "conversation", "prompt"):
        trees = load_records(shared("oasst-en100/en_100_tree.jsonl"), kind).records
        messages = load_records(shared("oasst-en100/en_100_message.jsonl"), kind).records
        assert trees == messages, kind


def test_oasst_dialogues_follow_rank_0_replies_to_an_assistant_leaf():
    path = shared("oasst-en100/en_100_message.jsonl")
    dialogues = load_records(path, "conversation").records
    assert len(dialogues) == 101
    assert Counter(len(d["messages"]) for d in dialogues) == {2: 55, 4: 46}
    index: dict[str, dict] = {}
    for root in read_jsonl(path):
        index |= oasst_index(root)
    for dialogue in dialogues:
        # Rebuild the path from the last message up and check each choice the walk made.
        chain, message = [], index[dialogue["id"]]
        while message is not None:
            chain.append(message)
            message = index.get(message["parent_id"]) if message["parent_id"] else None
        chain.reverse()
        assert [m["text"] for m in chain] == [m["content"] for m in dialogue["messages"]]
        assert chain[-1]["role"] == "assistant"
        for message in chain[1:]:
            if message["role"] == "assistant":
                siblings = [r for r in index[message["parent_id"]]["replies"] if r["role"] == "assistant"]
                assert message["rank"] == 0 or len(siblings) == 1
    texts = [tuple(m["content"] for m in d["messages"]) for d in dialogues]
    assert not any(a != b and b[: len(a)] == a for a in texts for b in texts)  # maximal: none is a prefix


def test_oasst_prompts_are_the_root_messages():
    path = shared("oasst-en100/en_100_tree.jsonl")
    prompts = load_records(path, "prompt").records
    roots = [tree["prompt"] for tree in read_jsonl(path)]
    assert [p["prompt"] for p in prompts] == [[user(root["text"])] for root in roots]
    assert [p["id"] for p in prompts] == [root["message_id"] for root in roots]


def test_oasst_converters_skip_deleted_and_unranked_replies():
    reply = {"role": "assistant", "deleted": False, "replies": []}
    tree = {
        "message_tree_id": "t",
        "prompt": {
            "message_id": "root",
            "role": "prompter",
            "text": "Q?",
            "replies": [
                {**reply, "message_id": "a", "text": "A", "rank": 1},
                {**reply, "message_id": "b", "text": "B", "rank": 0},
                {**reply, "message_id": "c", "text": "C", "rank": 2, "deleted": True},
                {**reply, "message_id": "d", "text": "D", "rank": None},
            ],
        },
    }
    assert oasst_ranked_groups(tree) == [
        {"id": "root", "prompt": [user("Q?")], "completions": ["A", "B"], "ranks": [1, 0]}
    ]
    assert oasst_dialogues(tree) == [{"id": "b", "messages": [user("Q?"), assistant("B")]}]


def test_sharegpt_dummy_conversations():
    path = shared("fastchat/data/dummy_conversation.json")
    result = load_records(path, "conversation")
    assert (result.format, len(result.records)) == ("sharegpt", 500)
    assert sum(len(r["messages"]) for r in result.records) == 2000
    assert result.records[0] == {
        "id": "identity_0",
        "messages": [
            user("Who are you?"),
            assistant(
                "I am Vicuna, a language model trained by researchers from Large Model Systems Organization (LMSYS)."
            ),
            user("Have a nice day!"),
            assistant("You too!"),
        ],
    }
    prompts = load_records(path, "prompt", limit=3).records
    assert len(prompts) == 3
    assert prompts[0] == {"id": "identity_0", "prompt": result.records[0]["messages"][:3]}


def test_self_instruct_seed_tasks_as_alpaca():
    tasks = read_jsonl(shared("self-instruct/data/seed_tasks.jsonl"))
    records = [
        {"id": task["id"], "instruction": task["instruction"], **instance}
        for task in tasks
        for instance in task["instances"]
    ]
    conversations = [validate_conversation(from_alpaca(record)) for record in records]
    assert len(conversations) == 175
    with_input = [(r, c) for r, c in zip(records, conversations, strict=True) if r["input"]]
    assert len(with_input) == 125
    record, conversation = with_input[0]
    assert record["id"] == "seed_task_1"
    assert conversation["messages"] == [
        user("What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
        assistant("The relation between the given pairs is that they are opposites."),
    ]
    assert conversations[0]["messages"][0] == user(tasks[0]["instruction"])  # empty input: instruction alone


# --- inspection ----------------------------------------------------------------------------------


def test_inspect_oasst_reports_k_distribution_and_character_lengths():
    report = inspect_file(shared("oasst-en100/en_100_tree.jsonl"))
    assert (report.format, report.kind, report.records, report.dropped) == ("oasst", "comparison", 212, 0)
    assert report.k_distribution == OASST_GROUP_SIZES
    assert report.turns_distribution == {}
    assert report.length_unit == "characters"
    assert set(report.lengths) == {"prompt", "completion"}
    for stats in report.lengths.values():
        assert list(stats) == ["p50", "p90", "p99", "max"]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    text = report.render()
    assert "format:  oasst" in text and "kind:    comparison" in text
    assert "records: 212 read, 0 dropped" in text
    assert "  K=3: 117\n" in text and "  K=9: 1\n" in text
    assert "lengths in characters (no tokenizer given):" in text


def test_inspect_counts_turns_of_conversations():
    report = inspect_file(shared("fastchat/data/dummy_conversation.json"))
    assert (report.kind, report.records) == ("conversation", 500)
    assert report.turns_distribution == {2: 167, 4: 166, 6: 167}
    assert "  6 turns: 167" in report.render()


def test_inspect_lists_the_first_problems():
    path = BROKEN / "mixed.jsonl"
    report = inspect_file(path, max_problems=2)
    assert (report.records, report.dropped, len(report.problems)) == (3, 3, 2)
    text = report.render()
    assert "problems (first 2 of 3):" in text
    assert f"  {path}:2: <json>: not valid JSON" in text
    assert f"  {path}:3: messages[1].role: two user turns in a row" in text
    assert f"{path}:5:" not in text


def test_inspect_with_a_tokenizer_reports_token_percentiles(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # one token per word: lengths are word counts
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    # 100 comparisons; prompt i has 2 messages of i+1 and 1 words, completions have 1 and i+1 words.
    records = [
        {
            "prompt": [system(" ".join(["w"] * (i + 1))), user("q")],
            "completions": ["yes", " ".join(["w"] * (i + 1))],
            "ranks": [0, 1],
        }
        for i in range(100)
    ]
    path = tmp_path / "k2.jsonl"
    write_jsonl(records, path)
    report = inspect_file(path, "comparison", tokenizer=tokenizer)
    assert report.length_unit == "tokens"
    assert report.lengths["prompt"] == {"p50": 51, "p90": 91, "p99": 100, "max": 101}
    # 200 completions: 100 of 1 word and 1..100 words.
    assert report.lengths["completion"] == {"p50": 1, "p90": 80, "p99": 98, "max": 100}
    assert "lengths in tokens:" in report.render()
    assert report.k_distribution == {2: 100}
