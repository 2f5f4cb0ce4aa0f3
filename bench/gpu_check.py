"""Every stage for a few steps on one GPU, on randomly initialised models of the embedded model's shape.

    python bench/gpu_check.py [--sizes 135m 1b] [--steps 4]          # on the GPU machine, about 4 minutes
    python bench/gpu_check.py --sizes tiny --steps 2 --device cpu    # the same code paths in a minute, anywhere

No weights travel and nothing is downloaded: each model is built from a config (the embedded
SmolLM2-135M's architecture, and a ~1B Llama), with the tokenizer given by `--tokenizer` (a folder; by
default the embedded base artifact's, which the device machine gets as a carried folder). For each size
it runs, in this process, SFT (full fine-tuning through the stage's trainer), the reward stage (full),
and PPO (LoRA, the hf engine), each on the demo data, and prints:

- tokens/s and MFU against the GPU's bf16 peak for SFT and the reward stage (6 x parameters per
  trained token, the embedding left out for the reward model, whose head is a scalar; the matmul peak
  measured here first: `--peak` overrides it);
- rollout tokens/s per engine that runs on the device (batch 16, 64 new tokens, sync included);
- PPO episodes/s, and the peak GPU memory of each stage.

trl, datasets and the other packages the GPU image lacks travel as wheels (see the device README).
`--launch zero3` runs PPO again under `accelerate launch --config_file configs/accelerate/zero3.yaml`
with one process (DeepSpeed wheel needed): ZeRO-3 on one GPU shards nothing, but its gather path is
the one that must work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.chat import prompt_ids, stop_token_ids  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.datasets import load_records  # noqa: E402
from pipeline.generation import SamplingSettings, make_engine  # noqa: E402
from pipeline.generation.panel_linear import kernel_missing_reason  # noqa: E402
from pipeline.models import EMBEDDED_MODEL, load_tokenizer, resolve_model  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

DEMO = REPO / "data" / "demo"
SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "tiny": (64, 128, 2, 4, 2),
    "135m": (576, 1536, 30, 9, 3),  # SmolLM2-135M
    "1b": (2048, 5632, 16, 32, 8),  # a ~1.1B Llama (TinyLlama's shape)
}


def build_model(size: str, tokenizer, folder: Path, dtype: torch.dtype) -> tuple[int, int]:
    """Save a randomly initialised Llama of `size`; its parameter count and its embedding's."""
    hidden, intermediate, layers, heads, kv_heads = SHAPES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()), model.get_input_embeddings().weight.numel()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * size**3 / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    gib = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"{gib:.1f} GiB"


def stage(name: str, overrides: dict, work: Path, store: ArtifactStore):
    import yaml

    module = __import__(f"stages.{name}.train", fromlist=["Config", "run"])
    config = work / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(overrides | {"store": str(store.root), "output_dir": str(work / "runs")})
    )
    cfg = load_config(module.Config, config, [])
    started = time.perf_counter()
    artifact = module.run(cfg, store)
    return artifact, time.perf_counter() - started


def sft_tokens(tokenizer, steps: int, batch: int, max_length: int) -> int:
    """Tokens SFT's first `steps` steps of `batch` conversations see (the data's mean length x conversations)."""
    from pipeline.chat import tokenize_conversation

    records = load_records(str(DEMO / "sft.jsonl"), "conversation").records
    lengths = [
        min(len(tokenize_conversation(tokenizer, r["messages"]).input_ids), max_length) for r in records
    ]
    return int(sum(lengths) / len(lengths) * steps * batch)


def reward_tokens(tokenizer, steps: int, groups: int, max_length: int) -> int:
    """Tokens the reward stage's first `steps` steps of `groups` comparisons see (each completion once)."""
    from pipeline.chat import tokenize_completion

    records = load_records(str(DEMO / "comparisons.jsonl"), "comparison").records
    per_group = [
        sum(
            len(tokenize_completion(tokenizer, r["prompt"], c, max_length).input_ids)
            for c in r["completions"]
        )
        for r in records
    ]
    return int(sum(per_group) / len(per_group) * steps * groups)


def check(size: str, args, tokenizer, work: Path, device: torch.device, peak: float) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = work / f"model-{size}"
    params, embedding = build_model(size, tokenizer, folder, dtype)
    store = ArtifactStore(work / "store")
    print(f"\n== {size}: {params / 1e6:.0f}M parameters, {dtype} on {device.type}", flush=True)

    batch, max_length = 8, 512
    sft, seconds = stage("sft", {
        "model": str(folder), "data": str(DEMO / "sft.jsonl"), "lora": {"enabled": False}, "max_steps": args.steps,
        "batch_size": batch, "max_length": max_length, "learning_rate": 1e-5, "report_to": "none",
        "eval_fraction": 0.05, "checkpoint_every": 0,
    }, work, store)  # fmt: skip
    tokens = sft_tokens(tokenizer, args.steps, batch, max_length)
    rate = tokens / sft.metrics["train_seconds"]
    print(f"SFT     {rate:9.0f} tokens/s  MFU {100 * 6 * params * rate / peak:5.1f}%  "
          f"({seconds:.0f} s in all)  peak memory {peak_memory(device)}", flush=True)  # fmt: skip

    reward, seconds = stage("reward", {
        "model": sft.id, "data": str(DEMO / "comparisons.jsonl"), "normalise_on": str(DEMO / "sft.jsonl"),
        "normalise_limit": 16, "lora": {"enabled": False}, "max_steps": args.steps, "groups_per_batch": 8,
        "max_length": 512, "learning_rate": 1e-5, "eval_every": 0, "report_to": "none", "checkpoint_every": 0,
    }, work, store)  # fmt: skip
    rate = reward_tokens(tokenizer, args.steps, 8, 512) / reward.metrics["train_seconds"]
    # A reward model has a scalar head, not the vocabulary projection the tied embedding is in SFT: its
    # matmuls are the parameters less the embedding (a lookup), or the small models' MFU is overstated.
    print(f"reward  {rate:9.0f} tokens/s  MFU {100 * 6 * (params - embedding) * rate / peak:5.1f}%  "
          f"({seconds:.0f} s in all)  peak memory {peak_memory(device)}", flush=True)  # fmt: skip

    policy = resolve_model(sft.id, store)
    from pipeline.models import load_causal_lm

    lm = load_causal_lm(policy, store, dtype).to(device).eval()
    prompts = [
        prompt_ids(tokenizer, r["prompt"])
        for r in load_records(str(DEMO / "prompts.jsonl"), "prompt").records[:16]
    ]
    engines = ["hf"] + ([] if device.type == "cuda" else ["cpu-llama"])
    engines += [] if device.type == "cuda" or kernel_missing_reason() else ["cpu-kernel"]
    for name in engines:
        engine = make_engine(name, lm, stop_ids=[], pad_id=tokenizer.pad_token_id)
        started = time.perf_counter()
        engine.sync(lm)
        seq = engine.sample(
            prompts, SamplingSettings(max_new_tokens=64), torch.Generator(device).manual_seed(0)
        )
        synchronize(device)
        rate = seq.response.numel() / (time.perf_counter() - started)
        print(f"rollout {name:<10} {rate:9.0f} tokens/s (batch 16, 64 new tokens, sync included)", flush=True)
    del lm

    ppo, seconds = stage("ppo", {
        "policy": sft.id, "reward": reward.id, "prompts": str(DEMO / "prompts.jsonl"), "eval_prompts": None,
        "steps": args.steps, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 64,
        "learning_rate": 1e-5, "report_to": "none", "progress": False, "checkpoint_every": 0,
        "rollout_engine": "hf", "lora": {"enabled": True, "r": 16, "alpha": 32},
    }, work, store)  # fmt: skip
    print(f"PPO     {ppo.metrics['episodes_per_second']:9.2f} episodes/s  ({seconds:.0f} s in all)  "
          f"peak memory {peak_memory(device)}", flush=True)  # fmt: skip
    if args.launch:
        config = work / "ppo.yaml"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{args.launch}.yaml"), "--num_processes", "1",
            "-m", "pipeline.cli", "ppo", "--config", str(config), "--run_name", f"ppo-{args.launch}",
        ]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        status = "ok" if result.returncode == 0 else f"FAILED:\n{result.stderr[-2000:]}"
        print(f"PPO under {args.launch}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["135m", "1b"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tokenizer", help="a folder with the tokenizer (default: the embedded base artifact's)"
    )
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    parser.add_argument(
        "--peak", type=float, help="the device's bf16 matmul peak in TFLOP/s (default: measured)"
    )
    parser.add_argument(
        "--launch", choices=["zero3", "fsdp2"], help="also run PPO under this launcher config"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    source = args.tokenizer or resolve_model(EMBEDDED_MODEL, ArtifactStore(args.store)).path
    tokenizer = load_tokenizer(source)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = args.peak * 1e12 if args.peak else matmul_peak(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; matmul peak {peak / 1e12:.1f} TFLOP/s ({dtype}); stop tokens {stop_token_ids(tokenizer)}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            check(size, args, tokenizer, Path(tmp) / size, device, peak)


if __name__ == "__main__":
    main()
