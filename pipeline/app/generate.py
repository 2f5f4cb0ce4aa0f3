"""`rlhf label generate`: sample K completions per prompt from one or more checkpoints into ranking tasks.

The K completions of a prompt are shared among the policies in turn (K = 4 from two policies: two
each), as InstructGPT's labellers ranked samples of several models side by side. Each completion
keeps the model source, the artifact it resolved to and the sampling settings and seed of its draw,
which the export carries into the comparison records and the labels artifact's lineage.

Draws go in batches of `BATCH` prompts, each with its own recorded seed, with a progress bar. The
tasks are queued in one transaction at the end, so an interrupted run queues nothing. A completion
that came out empty is dropped (a comparison shows only replies with text); a prompt left with fewer
than two is skipped and counted.
"""

from __future__ import annotations

import argparse
from typing import Any

from tqdm.auto import tqdm

from pipeline.app.db import LabelDB, LabelError
from pipeline.app.tasks import MAX_K, Completion, NewTask, add_tasks
from pipeline.data_sources import data_file
from pipeline.datasets import load_records
from pipeline.store import ArtifactStore

BATCH = 8


def shares(k: int, policies: int) -> list[int]:
    """Completions per policy: K split as evenly as it goes, the first policies taking the remainder."""
    return [k // policies + (i < k % policies) for i in range(policies)]


def generate_command(db: LabelDB, store: ArtifactStore, args: argparse.Namespace) -> int:
    from pipeline.generation import SamplingSettings, load_policy

    if not 2 <= args.k <= MAX_K:
        raise LabelError(f"--k {args.k}: a ranking task holds 2 to {MAX_K} completions")
    if len(args.policy) > args.k:
        raise LabelError(
            f"{len(args.policy)} policies for --k {args.k}: each policy needs one completion at least"
        )
    try:
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
        )
    except ValueError as err:
        raise LabelError(str(err)) from None
    prompts = [
        r["prompt"]
        for r in load_records(data_file(args.prompts, "prompt", store), "prompt", limit=args.limit).records
    ]
    drawn: list[list[Completion]] = [[] for _ in prompts]
    with tqdm(total=len(prompts) * args.k, desc="generate", unit="completion") as bar:
        for p, (source, count) in enumerate(zip(args.policy, shares(args.k, len(args.policy)), strict=True)):
            policy = load_policy(source, store, engine=args.engine)
            for draw in range(count):
                for start in range(0, len(prompts), BATCH):
                    seed = args.seed + 1_000_003 * p + 10_007 * draw + start
                    texts = policy.replies(
                        prompts[start : start + BATCH], settings, seed=seed, batch_size=BATCH
                    )
                    sampling = sampling_record(settings, seed=seed, engine=args.engine)
                    for i, text in enumerate(texts, start):
                        drawn[i].append(
                            Completion(text, source, policy.artifact_id, sampling | {"row": i - start})
                        )
                    bar.update(len(texts))
            del policy
    new, skipped = [], 0
    for i, (prompt, completions) in enumerate(zip(prompts, drawn, strict=True), 1):
        kept = [c for c in completions if c.text.strip()]
        if len(kept) < 2:
            skipped += 1
            continue
        new.append(NewTask("rank", prompt, f"generate {args.prompts}:{i}", kept))
    ids = add_tasks(db, new, overlap=args.overlap)
    print(
        f"queued {len(ids)} ranking tasks of up to {args.k} completions from {', '.join(args.policy)} in {db.path}"
    )
    if skipped:
        print(f"skipped {skipped} prompts left with fewer than 2 non-empty completions")
    return 0


def sampling_record(settings: Any, *, seed: int, engine: str) -> dict[str, Any]:
    return {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": settings.max_new_tokens,
        "seed": seed,
        "batch_size": BATCH,
        "engine": engine,
    }
