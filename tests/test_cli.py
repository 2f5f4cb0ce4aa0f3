"""The `rlhf` command line: data inspection, artifact listing, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from collections import Counter

from conftest import DEMO_DATA, REPO

from pipeline.cli import main


def test_data_inspect_counts_k_and_token_lengths(tiny_tokenizer_dir, capsys):
    path = DEMO_DATA / "comparisons.jsonl"
    ks = Counter(len(json.loads(line)["completions"]) for line in path.read_text().splitlines())
    assert main(["data", "inspect", str(path), "--tokenizer", str(tiny_tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert f"records: {sum(ks.values())} read, 0 dropped" in out
    for k, count in ks.items():
        assert f"K={k}: {count}" in out
    assert "lengths in tokens" in out and "p90" in out


def test_data_inspect_lists_the_first_problems_with_file_and_line_and_exits_1(capsys):
    broken = REPO / "tests" / "broken" / "missing_role.jsonl"
    assert main(["data", "inspect", str(broken), "--kind", "conversation", "--tokenizer", "none"]) == 1
    out = capsys.readouterr().out
    assert "1 dropped" in out and f"{broken}:3: messages[1].role: missing" in out


def test_data_inspect_without_a_tokenizer_measures_characters_and_exits_0_on_a_clean_file(capsys):
    path = DEMO_DATA / "sft.jsonl"
    longest = max(
        sum(len(m["content"]) for m in json.loads(line)["messages"]) for line in path.read_text().splitlines()
    )
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lengths in characters (no tokenizer given):" in out and f"max {longest}" in out


def test_stage_on_bad_data_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    broken = REPO / "tests" / "broken" / "two_user_turns.jsonl"
    code = main(
        ["sft", "--config", str(REPO / "configs" / "sft-tiny-test.yaml"), "--model", str(tiny_model_dir),
         "--data", str(broken), "--store", str(tmp_path / "store"), "--output_dir", str(tmp_path / "runs")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and f"{broken}:" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_artifacts_ls_and_show(tmp_path, capsys):
    from pipeline.store import ArtifactStore, dataset_fingerprint

    store = ArtifactStore(tmp_path / "store")
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "weights.bin").write_bytes(b"0123")
    base = store.publish("base", payload, config={}, metrics={})
    sft = store.publish(
        "sft", payload, config={"learning_rate": 0.1},
        inputs=[{"artifact": base.id, "role": "model"}, dataset_fingerprint(DEMO_DATA / "sft.jsonl")],
        metrics={"eval_loss": 1.25},
    )  # fmt: skip
    assert main(["artifacts", "ls", "--store", str(store.root)]) == 0
    listing = capsys.readouterr().out
    assert listing.index(base.id) < listing.index(sft.id)
    assert main(["artifacts", "show", "sft:latest", "--store", str(store.root)]) == 0
    shown = capsys.readouterr().out
    assert sft.id in shown and base.id in shown and "eval_loss" in shown and "learning_rate: 0.1" in shown
    assert main(["artifacts", "show", "reward:latest", "--store", str(store.root)]) == 2
    assert "no published 'reward' artifact" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
