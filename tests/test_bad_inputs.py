"""Every bad input a user can give ends in one line naming the problem and the fix, and changes nothing.

Each case runs the CLI's `main(argv)` in-process (a few go through the installed `rlhf` console script) and
must exit non-zero with exactly one `error:` line on stderr, the last one, holding each expected phrase, no
traceback, and the artifact store exactly as it was: every file's path, size and modification time.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DEMO_DATA, REPO
from ppo_helpers import REWARD_MEAN, REWARD_STD, build_liking_reward_model
from test_datasets import BROKEN, BROKEN_FILES

from pipeline.checkpoints import CONFIG_FILE
from pipeline.cli import main
from pipeline.config import load_config, to_dict
from pipeline.models import write_card
from pipeline.store import ArtifactStore
from stages.sft.train import Config as SFTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, a busy machine: see conftest

CONFIGS = REPO / "configs"


@dataclass
class World:
    """Files and artifacts the bad inputs are made of, shared by every case."""

    root: Path
    store: ArtifactStore
    sft_id: str
    reward_id: str
    other_template_reward_id: str
    model_dir: Path

    def sft(self, *extra: str) -> list[str]:
        return ["sft", "--config", str(CONFIGS / "sft-tiny-test.yaml"), "--store", str(self.store.root),
                "--output_dir", str(self.root / "runs"), "--model", str(self.model_dir),
                "--data", str(DEMO_DATA / "sft.jsonl"), *extra]  # fmt: skip

    def reward(self, *extra: str) -> list[str]:
        return ["reward", "--config", str(CONFIGS / "reward-tiny-test.yaml"), "--store", str(self.store.root),
                "--output_dir", str(self.root / "runs"), "--model", self.sft_id,
                "--data", str(DEMO_DATA / "comparisons.jsonl"), *extra]  # fmt: skip

    def ppo(self, *extra: str) -> list[str]:
        return ["ppo", "--config", str(CONFIGS / "ppo-tiny-test.yaml"), "--store", str(self.store.root),
                "--output_dir", str(self.root / "runs"), "--policy", self.sft_id, "--reward", self.reward_id,
                "--prompts", str(DEMO_DATA / "prompts.jsonl"), "--eval_prompts", "null", *extra]  # fmt: skip

    def path(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    store = ArtifactStore(root / "store")
    sft = store.publish("sft", tiny_model_dir, config={}, meta={})
    reward_dir = build_liking_reward_model(tiny_tokenizer, root / "liking")
    write_card(reward_dir, {"kind": "reward", "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD})
    reward = store.publish("reward", reward_dir, config={}, meta={})
    # The same reward model, its prompts rendered by another chat template than the policy's.
    config = json.loads((reward_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (reward_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (reward_dir / "chat_template.jinja").unlink(missing_ok=True)
    other = store.publish("reward", reward_dir, config={}, meta={})
    # What a publish killed before its rename leaves in a local store.
    shutil.copytree(tiny_model_dir, store.root + "/.tmp-sft-20260101-000000-000000-dead")

    (root / "bad.yaml").write_text("learning_rate: [1,\n")
    (root / "list.yaml").write_text("- learning_rate\n")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (root / "plain.jsonl.gz").write_text('{"messages": []}\n')  # gzip by name only
    (root / "no-config").mkdir()
    t5 = root / "t5"  # a model no causal-LM class loads, with a working tokenizer beside it
    shutil.copytree(tiny_model_dir, t5)
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16, "num_layers": 1}))
    (root / "job.yaml").write_text(
        "sft: configs/sft-tiny-test.yaml\nrewards: configs/reward-tiny-test.yaml\n"
    )

    # A run killed mid-save: one complete checkpoint (its config had another learning rate), one without.
    killed = root / "runs" / "killed"
    (killed / "checkpoint-8").mkdir(parents=True)
    (killed / "checkpoint-4").mkdir()
    cfg = load_config(SFTConfig, CONFIGS / "sft-tiny-test.yaml", ["--data", "d.jsonl"])
    saved = to_dict(cfg) | {
        "learning_rate": 0.5,
        "model": str(tiny_model_dir),
        "data": str(DEMO_DATA / "sft.jsonl"),
    }
    (killed / "checkpoint-4" / CONFIG_FILE).write_text(json.dumps(saved))
    return World(root, store, sft.id, reward.id, other.id, tiny_model_dir)


# (id, argv from the world, phrases the one error line must hold)
CASES = [
    # configs
    ("config-missing", lambda w: ["sft", "--config", w.path("nope.yaml")], ["config file not found"]),
    ("config-not-yaml", lambda w: ["sft", "--config", w.path("bad.yaml")], ["not valid YAML"]),
    ("config-not-a-mapping", lambda w: ["sft", "--config", w.path("list.yaml")], ["expected a mapping"]),
    ("unknown-key", lambda w: w.sft("--learnin_rate", "1"), ["unknown key 'learnin_rate'", "did you mean 'learning_rate'"]),
    ("renamed-reward-lr", lambda w: w.reward("--lr", "1e-3"), ["'lr' was renamed to 'learning_rate'", "--learning_rate"]),
    ("renamed-reward-init", lambda w: w.reward("--init", "sft:latest"), ["'init' was renamed to 'model'"]),
    ("renamed-sft-eval-steps", lambda w: w.sft("--eval_steps", "5"), ["'eval_steps' was renamed to 'eval_every'"]),
    ("renamed-sft-warmup-ratio", lambda w: w.sft("--warmup_ratio", "0.1"), ["renamed to 'warmup_steps'"]),
    ("wrong-type", lambda w: w.sft("--max_steps", "many"), ["max_steps must be int; got 'many'"]),
    ("bad-value", lambda w: w.sft("--eval_fraction", "1.5"), ["eval_fraction must be in [0, 1), got 1.5"]),
    ("nested-not-a-mapping", lambda w: w.sft("--lora", "3"), ["lora must be a mapping of LoraSettings fields"]),
    ("unknown-nested-key", lambda w: w.sft("--lora.rank", "4"), ["unknown key 'lora.rank'", "valid keys: enabled, r,"]),
    ("unknown-scheduler", lambda w: w.reward("--lr_scheduler", "sideways"), ["sideways is not a valid", "cosine"]),
    ("ppo-batch-split", lambda w: w.ppo("--batch_size", "6", "--mini_batch_size", "4"), ["must be a multiple of mini_batch_size"]),
    ("ppo-rloo-one-reply", lambda w: w.ppo("--advantage", "rloo"), ["needs samples_per_prompt of at least 2"]),
    ("ppo-rloo-value-setting", lambda w: w.ppo("--advantage", "rloo", "--samples_per_prompt", "4", "--critic", "head"), ["trains no value model", "advantage: gae"]),
    ("ppo-lora-top-layers", lambda w: w.ppo("--lora.top_layers", "1"), ["policy_layers", "remove lora.top_layers"]),
    ("sft-top-layers-without-lora", lambda w: w.sft("--lora.top_layers", "1"), ["lora.top_layers places the LoRA adapter", "lora.enabled: true"]),
    ("sft-top-layers-too-many", lambda w: w.sft("--lora.enabled", "true", "--lora.top_layers", "99"), ["lora.top_layers must be below the model", "0 adapts every layer"]),
    ("ppo-prompt-split", lambda w: w.ppo("--samples_per_prompt", "3"), ["multiple of samples_per_prompt (3)"]),
    ("no-data", lambda w: ["sft", "--store", str(w.store.root)], ["data is not set", "--data FILE"]),
    ("trainer-args", lambda w: w.sft("--trainer_args", "{weight_decy: 0.1}"), ["weight_decy", "trl.SFTConfig"]),
    ("not-an-override", lambda w: ["sft", "learning_rate=1"], ["expected an override like --key value"]),
    ("unknown-command", lambda w: ["frobnicate"], ["unknown command 'frobnicate'", "rlhf --help"]),
    ("missing-argument", lambda w: ["reward", "score", "--prompt", "hi"], ["required: --artifact", "--help"]),
    ("bad-choice", lambda w: ["data", "inspect", str(DEMO_DATA / "sft.jsonl"), "--kind", "chat"], ["invalid choice: 'chat'"]),
    ("job-missing", lambda w: ["run", "--config", w.path("nope.yaml")], ["job file not found"]),
    ("job-unknown-stage", lambda w: ["run", "--config", w.path("job.yaml")], ["unknown key 'rewards'", "did you mean 'reward'"]),
    # data
    ("data-missing", lambda w: w.sft("--data", w.path("missing.jsonl")), ["missing.jsonl: <file>: no such file"]),
    ("data-folder", lambda w: w.sft("--data", w.path("no-config")), ["is a directory: pass a .jsonl, .json or .parquet file"]),
    ("data-binary", lambda w: w.sft("--data", w.path("binary.jsonl")), ["binary.jsonl:1:"]),
    ("data-gzip-not-gzip", lambda w: w.sft("--data", w.path("plain.jsonl.gz")), ["not a readable gzip file"]),
    ("data-format-name", lambda w: w.sft("--data_format", "yaml"), ["unknown format 'yaml'", "hh-rlhf"]),
    ("data-kind-for-stage", lambda w: w.sft("--data", str(DEMO_DATA / "prompts.jsonl")), ["prompts.jsonl:1"]),
    ("inspect-missing", lambda w: ["data", "inspect", w.path("missing.jsonl")], ["no such file"]),
    # references and stores
    ("artifact-unknown", lambda w: w.sft("--model", "sft-20990101-000000-000000-beef"), ["no artifact 'sft-20990101-000000-000000-beef'", "rlhf artifacts ls"]),
    ("artifact-none-of-stage", lambda w: w.ppo("--reward", "ppo:latest"), ["no published 'ppo' artifact", "run `rlhf ppo` first"]),
    ("artifact-wrong-stage", lambda w: ["reward", "score", "--store", str(w.store.root), "--artifact", w.sft_id, "--prompt", "hi", "--completion", "hello"], ["is not a reward model", "reward:latest"]),
    ("artifact-half-published", lambda w: w.sft("--model", w.store.root + "/.tmp-sft-20260101-000000-000000-dead"), ["unfinished publish", "rlhf artifacts ls"]),
    ("show-half-published", lambda w: ["artifacts", "show", w.store.root + "/.tmp-sft-20260101-000000-000000-dead"], ["unfinished publish"]),
    ("store-protocol", lambda w: ["artifacts", "ls", "--store", "nosuch://bucket/x"], ["cannot open nosuch://bucket/x"]),
    ("store-unreachable-http", lambda w: ["artifacts", "ls", "--store", "http://127.0.0.1:9/store"], ["cannot reach store http://127.0.0.1:9/store", "check the URL"]),
    # models
    ("model-missing-folder", lambda w: w.sft("--model", w.path("no-such-model")), ["neither a model folder", "check the path"]),
    ("model-empty-folder", lambda w: w.sft("--model", w.path("no-config")), ["cannot load a tokenizer", "save_pretrained folder"]),
    ("model-gguf-missing", lambda w: w.sft("--model", w.path("missing.gguf")), ["GGUF file not found"]),
    ("model-hub-offline", lambda w: w.sft("--model", "some-org/some-model"), ["cannot load a tokenizer from 'some-org/some-model'", "network"]),
    ("model-not-causal-lm", lambda w: w.sft("--model", w.path("t5")), ["cannot load a causal LM", "name a causal language model"]),
    ("reward-template-differs", lambda w: w.ppo("--reward", w.other_template_reward_id), ["another tokenizer or chat template than the policy"]),
    # a killed run's leftovers
    ("resume-half-saved", lambda w: w.sft("--resume", w.path("runs/killed/checkpoint-8")), ["not a complete checkpoint", "--resume latest"]),
    ("resume-missing", lambda w: w.sft("--resume", w.path("runs/killed/checkpoint-99")), ["no such checkpoint folder"]),
    ("resume-changed-setting", lambda w: w.sft("--run_name", "killed", "--resume", "latest"), ["learning_rate is 0.003 here but 0.5 in the checkpoint", "--learning_rate 0.5", "--force"]),
]  # fmt: skip


def broken_data(kind: str, path: Path):
    """The stage that reads `kind` records, given the broken file as its data."""
    if kind == "conversation":
        return lambda w: w.sft("--data", str(path))
    if kind == "comparison":
        return lambda w: w.reward("--data", str(path))
    return lambda w: w.ppo("--prompts", str(path))


# Every DataError kind tests/broken holds, through the stage that reads it: file, line and field, then the problem.
CASES += [
    (f"data-{name}", broken_data(kind, BROKEN / name), [f"{BROKEN / name}{'' if line is None else f':{line}'}: {field}: ", message])
    for name, kind, line, field, message in BROKEN_FILES
]  # fmt: skip


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every file under the store with its size and modification time: a changed byte or a new file shows."""
    if not root.exists():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def assert_one_line_error(code: int, stderr: str, phrases: list[str]) -> None:
    assert code != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("argv", "phrases"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_and_changes_nothing(world, argv, phrases, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny-test presets name the demo data relative to the repository
    before = listing(Path(world.store.root))
    code = main(argv(world))
    assert_one_line_error(code, capsys.readouterr().err, phrases)
    assert listing(Path(world.store.root)) == before


class Refusing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request as S3 refuses an unknown access key."""

    def refuse(self):
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
            b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Dummy credentials and one attempt per request; the test sets the endpoint. s3fs caches clients, so start clean."""
    s3fs = pytest.importorskip("s3fs")

    for name, value in {
        "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_s3_store_that_refuses_the_credentials(s3_env, world, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s3_env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        code = main(["artifacts", "ls", "--store", "s3://bucket/store"])
    finally:
        server.shutdown()
    phrases = ["store s3://bucket/store refused access", "AWS_ACCESS_KEY_ID"]
    assert_one_line_error(code, capsys.readouterr().err, phrases)


def test_an_s3_store_that_cannot_be_reached(s3_env, world, capsys):
    s3_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the discard port: nothing listens
    code = main(world.sft("--store", "s3://bucket/store", "--model", world.sft_id))
    phrases = ["cannot reach store s3://bucket/store", "AWS_ENDPOINT_URL_S3"]
    assert_one_line_error(code, capsys.readouterr().err, phrases)


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["data", "inspect", "no/such/file.jsonl"], "no/such/file.jsonl: <file>: no such file"),
    ],
)
def test_the_console_script_prints_one_line_too(argv, phrase):
    script = Path(sys.executable).parent / "rlhf"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [str(script), *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert_one_line_error(result.returncode, result.stderr, [phrase])
