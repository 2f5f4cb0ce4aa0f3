"""The app's chat path against plain transformers streaming, on the embedded model.

    .venv/bin/python bench/chat_latency.py [--repeats 5] [--new-tokens 64] [--engine auto]

Ours: pipeline.generation.load_policy(...).stream(messages, settings, seed), what the chat and arena tabs
call (the chat template, stop tokens and rollout engine the stages use; `auto` picks the engine by its
rule). The peer: `model.generate(..., streamer=TextIteratorStreamer(...))` in a thread, the usual way a
transformers chat app streams, on the same model, prompt and sampling settings. Each reports time to
first token (from the call to the first non-empty text) and tokens per second after it, medians over
`--repeats` runs alternating the two, and the ratios. Both start from a loaded model: loading is the
app's model cache's business, measured once and printed apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from pipeline.chat import prompt_ids, stop_token_ids  # noqa: E402
from pipeline.generation import SamplingSettings, load_policy  # noqa: E402
from pipeline.models import EMBEDDED_MODEL  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

MESSAGES = [{"role": "user", "content": "Give me three tips for staying focused while working from home."}]


def ours(policy, settings: SamplingSettings, seed: int) -> tuple[float, int, float]:
    """(time to first token, tokens, seconds in all) through the app's chat path."""
    started = time.perf_counter()
    first, tokens = None, 0
    for text in policy.stream(MESSAGES, settings, seed=seed):
        tokens += 1
        if first is None and text:
            first = time.perf_counter() - started
    return first or 0.0, tokens, time.perf_counter() - started


def peer(model, tokenizer, settings: SamplingSettings, seed: int) -> tuple[float, int, float]:
    """The same through generate with a TextIteratorStreamer (one text piece per token or word)."""
    ids = torch.tensor([prompt_ids(tokenizer, MESSAGES)])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(seed)
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
        do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, streamer=streamer,
    )  # fmt: skip
    started = time.perf_counter()
    outputs = {}
    thread = threading.Thread(target=lambda: outputs.setdefault("ids", model.generate(**kwargs)))
    thread.start()
    first = None
    for text in streamer:
        if first is None and text:
            first = time.perf_counter() - started
    thread.join()
    tokens = outputs["ids"].shape[1] - ids.shape[1]
    return first or 0.0, tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    args = parser.parse_args()

    started = time.perf_counter()
    policy = load_policy(EMBEDDED_MODEL, ArtifactStore(args.store), engine=args.engine)
    print(f"model loaded in {time.perf_counter() - started:.1f} s; engine {policy.engine.name}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.9)
    runs = {"ours": [], "generate+streamer": []}
    ours(policy, settings, seed=0)  # warm-up: first calls allocate
    peer(policy.model, policy.tokenizer, settings, seed=0)
    for seed in range(args.repeats):
        runs["ours"].append(ours(policy, settings, seed))
        runs["generate+streamer"].append(peer(policy.model, policy.tokenizer, settings, seed))
    medians = {}
    for name, results in runs.items():
        ttft = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] / max(r[2] - r[0], 1e-9) for r in results)
        medians[name] = (ttft, rate)
        print(f"{name:>18}: time to first token {1000 * ttft:7.1f} ms (median of {len(results)}), "
              f"{rate:6.1f} tokens/s after it")  # fmt: skip
    (ttft_ours, rate_ours), (ttft_peer, rate_peer) = medians["ours"], medians["generate+streamer"]
    print(
        f"ratio: time to first token {ttft_peer / ttft_ours:.2f}x shorter, tokens/s {rate_ours / rate_peer:.2f}x"
    )


if __name__ == "__main__":
    main()
