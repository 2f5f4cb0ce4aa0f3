"""How much of a reward model's verdict is reply length? Score the SFT policy's replies whole, cut, and short.

    .venv/bin/python bench/reward_length.py --store STORE --rewards REF [REF ...] [--policy sft:latest] \\
        [--prompts ../shared/data/self-instruct/data/seed_tasks.jsonl] [--count 48] [--max-new-tokens 320]

The policy answers `--count` prompts (a seeded shuffle of `--prompts`; temperature 1, fixed seed), and
each reward model scores every reply three ways, in its standardised units: whole; its first 24 tokens
only (a short reply on the same subject); and, for replies longer than `--cut` tokens, their first
`--cut` tokens (what a `max_new_tokens` of that size would have sampled). Printed per reward model: the
mean score of whole replies, the Pearson correlation of score and length, how often the first 24
tokens beat the whole reply, and whole against cut. A reward model whose score falls with length
teaches PPO to shorten replies (stages/ppo/length.py; bench/RESULTS.md, "PPO on prompts nobody tuned to").
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.datasets import load_records  # noqa: E402
from pipeline.generation import SamplingSettings  # noqa: E402
from pipeline.generation.policy import load_policy  # noqa: E402
from pipeline.scoring import load_reward  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

SHORT = 24


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default=os.environ.get("RLHF_STORE", str(REPO / "artifacts")))
    parser.add_argument("--policy", default="sft:latest")
    parser.add_argument("--rewards", nargs="+", required=True)
    parser.add_argument(
        "--prompts",
        default=str(REPO.parent / "shared" / "data" / "self-instruct" / "data" / "seed_tasks.jsonl"),
    )
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--cut", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    store = ArtifactStore(args.store)
    policy = load_policy(args.policy, store)
    records = load_records(args.prompts, "prompt").records
    random.Random(args.seed).shuffle(records)
    prompts = [r["prompt"] for r in records[: args.count]]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0)
    replies = policy.replies(prompts, settings, seed=args.seed, batch_size=16)
    tokens = [policy.tokenizer(text, add_special_tokens=False).input_ids for text in replies]
    lengths = [len(ids) for ids in tokens]
    print(f"{args.policy} on {len(prompts)} prompts of {args.prompts}: reply length median "
          f"{statistics.median(lengths)}, {sum(n > args.cut for n in lengths)} over {args.cut} tokens")  # fmt: skip
    print(f"{'reward model':<40} {'whole':>6} {'corr(score, length)':>20} {'first 24 beat whole':>20} "
          f"{'whole / cut at ' + str(args.cut):>22}")  # fmt: skip
    for ref in args.rewards:
        reward = load_reward(ref, store)
        whole, short, cut = [], [], []
        for prompt, text, ids in zip(prompts, replies, tokens, strict=True):
            variants = [text, policy.tokenizer.decode(ids[:SHORT])]
            if len(ids) > args.cut:
                variants.append(policy.tokenizer.decode(ids[: args.cut]))
            scores = [reward.normalise(raw) for raw in reward.score(prompt, variants)]
            whole.append(scores[0])
            short.append(scores[1])
            if len(scores) > 2:
                cut.append((scores[0], scores[2]))
        beats = sum(s > w for s, w in zip(short, whole, strict=True))
        cut_text = (
            f"{statistics.mean(w for w, _ in cut):+.2f} / {statistics.mean(c for _, c in cut):+.2f}"
            if cut
            else "-"
        )
        print(f"{ref:<40} {statistics.mean(whole):>+6.2f} {statistics.correlation(lengths, whole):>+20.2f} "
              f"{f'{beats}/{len(whole)}':>20} {cut_text:>22}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
