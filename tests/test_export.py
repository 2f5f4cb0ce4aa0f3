"""`rlhf artifacts export`: folders that plain transformers (and peft) load to the same replies and scores.

The loads run in a fresh Python process that never imports this project (it checks sys.modules), so a
folder that only works with our loaders' help fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from pipeline.chat import prompt_ids, stop_token_ids
from pipeline.cli import main as cli_main
from pipeline.models import ModelError, load_causal_lm, load_tokenizer, read_card, resolve_model
from pipeline.scoring import load_reward

PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
REPLIES = ["Six minutes, then ice water.", "Eggs are versatile! Let me tell you about omelettes."]
NEW_TOKENS = 24

# Runs with nothing but transformers and peft; prints what each folder produced as JSON.
FRESH_PROCESS = r"""
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

job = json.loads(sys.argv[1])
out = {"replies": {}, "scores": {}}
for name, path in job["pipelines"].items():
    chat = pipeline("text-generation", model=path, device="cpu", dtype=torch.float32)
    result = chat(job["prompt"], max_new_tokens=job["new_tokens"], do_sample=False)
    out["replies"][name] = result[0]["generated_text"][-1]["content"]
for name, path in job["adapters"].items():
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(job["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=job["new_tokens"], do_sample=False)[0, ids["input_ids"].shape[1]:]
    out["replies"][name] = tokenizer.decode(new, skip_special_tokens=True)
tokenizer = AutoTokenizer.from_pretrained(job["reward"])
model = AutoModelForSequenceClassification.from_pretrained(job["reward"], dtype=torch.float32).eval()
texts = [
    tokenizer.apply_chat_template(job["prompt"] + [{"role": "assistant", "content": reply}], tokenize=False).rstrip()
    for reply in job["replies"]
]
tokenizer.padding_side = "right"  # a batch padded on the right: each row scored at its own last token
batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
with torch.no_grad():
    out["scores"]["batch"] = model(**batch).logits[:, 0].tolist()
    out["scores"]["alone"] = [
        model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item() for text in texts
    ]
out["normalisation"] = [model.config.reward_mean, model.config.reward_std, model.config.reward_bias]
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages"))
assert not ours, f"the fresh process imported the project: {ours}"
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(artifact_chain, tmp_path_factory):
    """Every model of the chain exported merged, and the SFT and PPO adapters on their exported bases."""
    chain, out = artifact_chain, tmp_path_factory.mktemp("exports")
    store = ["--store", str(chain.store.root)]
    for name, artifact in (
        ("base", chain.base),
        ("sft", chain.sft),
        ("reward", chain.reward),
        ("ppo", chain.ppo),
    ):
        assert cli_main(["artifacts", "export", artifact.id, "--out", str(out / name), *store]) == 0
    for name, artifact, base in (("sft-adapter", chain.sft, "base"), ("ppo-adapter", chain.ppo, "sft")):
        args = ["artifacts", "export", artifact.id, "--adapter", "--base", str(out / base)]
        assert cli_main([*args, "--out", str(out / name), *store]) == 0
    return out


@pytest.fixture(scope="module")
def fresh(exported, tmp_path_factory):
    job = {
        "pipelines": {name: str(exported / name) for name in ("sft", "ppo")},
        "adapters": {name: str(exported / name) for name in ("sft-adapter", "ppo-adapter")},
        "reward": str(exported / "reward"),
        "prompt": PROMPT,
        "replies": REPLIES,
        "new_tokens": NEW_TOKENS,
    }
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the repository: nothing of ours on the path by accident
    done = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, json.dumps(job)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def greedy_reply(artifact, store) -> str:
    """What the pipeline's own loader produces: the artifact loaded as the stages load it, greedy."""
    resolved = resolve_model(artifact.id, store)
    tokenizer = load_tokenizer(resolved.path)
    model = load_causal_lm(resolved, store).eval()
    ids = torch.tensor([prompt_ids(tokenizer, PROMPT)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_exported_policy_gives_the_pipelines_greedy_reply_in_plain_transformers(artifact_chain, fresh, stage):
    chain = artifact_chain
    ours = greedy_reply(getattr(chain, stage), chain.store)
    assert ours.strip(), "the tiny policy answered nothing: the comparison would prove nothing"
    assert fresh["replies"][stage] == ours
    assert fresh["replies"][f"{stage}-adapter"] == ours  # the adapter on its exported base: the same model


def test_ppo_and_sft_replies_differ(artifact_chain, fresh):
    """Otherwise the PPO export could be the SFT model and the test above would not notice."""
    assert fresh["replies"]["ppo"] != fresh["replies"]["sft"]


def test_exported_reward_model_gives_the_raw_score_of_rlhf_reward_score(artifact_chain, fresh, capsys):
    chain = artifact_chain
    args = ["reward", "score", "--artifact", chain.reward.id, "--store", str(chain.store.root)]
    assert cli_main([*args, "--prompt", PROMPT[0]["content"], *(f"--completion={r}" for r in REPLIES)]) == 0
    printed = [
        float(m.group(1))
        for m in re.finditer(r"^\s+(-?\d+\.\d+)\s+-?\d+\.\d+\s+", capsys.readouterr().out, re.M)
    ]
    ours = load_reward(chain.reward.id, chain.store).score(PROMPT, REPLIES)
    card = read_card(chain.store.local_path(chain.reward))
    assert len(printed) == len(REPLIES)
    for name in ("alone", "batch"):
        for i, (theirs, exact, shown) in enumerate(zip(fresh["scores"][name], ours, printed, strict=True)):
            assert theirs == pytest.approx(exact, rel=1e-5, abs=1e-6), f"{name} score of reply {i}"
            assert theirs == pytest.approx(shown, abs=6e-4), f"{name} score of reply {i} against the CLI"
    assert ours[0] != pytest.approx(ours[1], abs=1e-4)  # two replies that score differently
    assert fresh["normalisation"] == pytest.approx(
        [card["reward_mean"], card["reward_std"], card["reward_bias"]]
    )


def test_pad_trap_is_defused(artifact_chain, exported):
    """The chain's base pads with its end-of-turn token; an export must pad with a token of its own."""
    base_config = json.loads((Path(artifact_chain.base.uri) / "config.json").read_text())
    tokenizer = load_tokenizer(str(exported / "reward"))
    assert base_config["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the trap is set
    for name in ("base", "sft", "reward", "ppo"):
        config = json.loads((exported / name / "config.json").read_text())
        exported_tokenizer = load_tokenizer(str(exported / name))
        assert config["pad_token_id"] == exported_tokenizer.pad_token_id, name
        assert config["pad_token_id"] not in stop_token_ids(exported_tokenizer), name
    for name in ("sft", "ppo", "sft-adapter", "ppo-adapter"):
        generation = json.loads((exported / name / "generation_config.json").read_text())
        assert generation["eos_token_id"] == stop_token_ids(tokenizer), name
        assert generation["pad_token_id"] == tokenizer.pad_token_id, name


def test_export_layout_and_cards(artifact_chain, exported):
    chain = artifact_chain
    for name in ("base", "sft", "reward", "ppo"):
        files = {p.name for p in (exported / name).iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
            "README.md",
        } <= files
        assert not files & {"adapter_config.json", "rlhf_model.json", "manifest.json", "value"}, name
        assert not list(exported.glob(f".{name}.tmp-*"))
    adapter = json.loads((exported / "ppo-adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(exported / "sft")
    assert (exported / "ppo-adapter" / "adapter_model.safetensors").read_bytes() == (
        Path(chain.ppo.uri) / "adapter_model.safetensors"
    ).read_bytes()
    ppo_card = ModelCard.load(exported / "ppo" / "README.md")
    assert ppo_card.data.library_name == "transformers" and ppo_card.data.pipeline_tag == "text-generation"
    curve = [json.loads(line) for line in (Path(chain.ppo.uri) / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in curve if "eval/score" in row]
    assert len(evaluations) == 3  # before training, after step 1, after step 2
    for row in evaluations:
        assert f"| {row['step']} | {row['eval/score']:.4g} |" in ppo_card.text
    assert 'pipeline("text-generation", model="PATH")' in ppo_card.text
    reward_card = ModelCard.load(exported / "reward" / "README.md")
    assert reward_card.data.pipeline_tag == "text-classification"
    assert "AutoModelForSequenceClassification" in reward_card.text and "reward_mean" in reward_card.text
    adapter_card = ModelCard.load(exported / "ppo-adapter" / "README.md")
    assert adapter_card.data.library_name == "peft" and "AutoPeftModelForCausalLM" in adapter_card.text


def test_export_refusals_name_the_fix(artifact_chain, tmp_path, capsys):
    chain = artifact_chain
    store = ["--store", str(chain.store.root)]
    cases = [
        ([chain.ppo.id, "--adapter"], rf"adapter on artifact {chain.sft.id}.*export that one first.*--base"),
        ([chain.reward.id, "--adapter", "--base", "x/y"], "reward model: export it merged"),
        ([chain.base.id, "--adapter", "--base", "x/y"], "holds full weights, not an adapter"),
        ([chain.sft.id, "--base", "x/y"], "add --adapter"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert cli_main(["artifacts", "export", *args, "--out", str(out), *store]) == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli_main(["artifacts", "export", chain.sft.id, "--out", str(taken), *store]) == 2
    assert "already exists" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(ModelError, match="no model in it"):
        from pipeline.export import export_artifact

        labels = chain.store.publish("labels", tmp_path / "taken", config={})
        export_artifact(chain.store, labels.id, tmp_path / "labels-out")
