"""Shared fixtures: a tiny tokenizer trained locally and tiny random Llama models built from configs.

Nothing here touches the network. The tokenizer is a byte-level BPE trained on the project's own demo
data (plus a few fixed sentences), with ChatML markers, so chat templates and masks behave like a
real chat model's at a fraction of the cost.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# trackio reads its folder when first imported: a fresh one per test session, so that the tracker tests
# read back exactly this session's runs (a shared folder would hold every earlier session's runs of the
# same name), and nothing lands in the home folder.
TRACKIO_DIR = tempfile.mkdtemp(prefix="rlhf-tests-trackio-")
atexit.register(shutil.rmtree, TRACKIO_DIR, ignore_errors=True)
os.environ["TRACKIO_DIR"] = TRACKIO_DIR

FIXED_TEXT = [
    "Hello! How can I help you today?",
    "Sure, here is a short answer. Could you tell me a bit more about what you need?",
    "I can't help with that, but I can suggest a safer alternative.",
    "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level.",
    "def add(a, b):\n    return a + b",
]


def shared_data_dir() -> Path:
    """../shared/data beside the repository (CI lays it there); RLHF_SHARED_DATA overrides."""
    return Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))


def demo_texts() -> list[str]:
    texts = list(FIXED_TEXT)
    for path in sorted(DEMO_DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for message in record.get("messages", []) + record.get("prompt", []):
                texts.append(message["content"])
            texts.extend(record.get("completions", []))
    return texts


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.chat import DEFAULT_CHAT_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(demo_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside, and put its earlier state back after.

    Module initialisers (nn.Linear, peft's adapters) draw from the global generator, so a model built
    without this would depend on whatever the tests before it drew, and would change what comes after.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_llama(tokenizer, out_dir: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from pipeline.models import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A save_pretrained folder with a random 2-layer Llama (hidden 32) and the tiny tokenizer."""
    return build_tiny_llama(tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch in one thread for a module's tests: tiny models gain nothing from more, on a busy machine two threads
    spin waiting on each other (a tiny PPO step takes seconds instead of milliseconds), and sums come out in one
    order whatever the machine, as in the single-threaded subprocesses some tests compare with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def store(tmp_path):
    from pipeline.store import ArtifactStore

    return ArtifactStore(tmp_path / "store")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(
    cli_args: list[str], *, processes: int = 2, timeout: int = 600, cwd: Path | None = None
):
    """Run `rlhf <cli_args>` under `accelerate launch` with `processes` CPU processes (gloo backend).

    Accelerate's multi-process launcher is the `--multi_gpu` one; ACCELERATE_USE_CPU=1 makes it start
    CPU processes, which is how the same code path as many GPUs is tested on a CPU-only machine.
    """
    import subprocess
    import sys

    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "pipeline.cli", *cli_args,
    ]  # fmt: skip
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env)


@pytest.fixture(scope="session")
def artifact_chain(tmp_path_factory, tiny_tokenizer_dir):
    """base -> sft -> reward -> ppo published through the CLI, logged to TensorBoard and trackio (~30 s)."""
    from artifact_chain import build_chain

    return build_chain(tmp_path_factory.mktemp("chain"), tiny_tokenizer_dir)


# -- a real S3-protocol server (moto), for the store's tests -----------------------------------------

BUCKET = "rlhf-artifacts"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on loopback, with dummy credentials; the endpoint reaches s3fs through botocore's env."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    no_config = tmp_path_factory.mktemp("aws") / "none"
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(no_config),
            "AWS_SHARED_CREDENTIALS_FILE": str(no_config),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_S3": endpoint,
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # a client made before this endpoint was set
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint, request, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    return f"s3://{BUCKET}/{request.node.name}"


def object_keys(prefix: str) -> list[str]:
    import boto3

    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """The tiny Llama at `model_dir` as an F32 GGUF file, laid out as llama.cpp writes one (Q and K rows
    permuted for its rotary layout, the byte-level BPE vocabulary and merges in the metadata): the embedded
    model's conversion path, at a size that converts in a second."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {token: i for token, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's convert_hf_to_gguf.py
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)
        )

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    weights = {k: v.numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for layer in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = weights[f"model.layers.{layer}.{ours}.weight"]
            if theirs == "attn_q":
                weight = permute(weight, config.num_attention_heads)
            elif theirs == "attn_k":
                weight = permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{theirs}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
