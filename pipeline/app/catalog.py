"""The models a person can chat with, and the loaded ones kept for the chat and arena tabs.

Public names (the chat tab and the arena tab use these):

- `ModelEntry`: one model to offer: `ref` (what to load it by), `stage`, `id`, `created`, `headline`,
  `label` (one line for a dropdown), `provenance` (the artifact id, or the ref for a checkpoint).
- `list_models(store, run_dirs=()) -> list[ModelEntry]`: every base, sft and ppo artifact, and every
  complete checkpoint of the PPO runs (those the ppo artifacts name in `meta.run_dir`, plus `run_dirs`),
  newest first.
- `list_reward_models(store) -> list[ModelEntry]`: the reward artifacts, newest first.
- `ModelCache(store, max_models=3, max_bytes=None, engine="auto")`: `get(ref) -> LoadedPolicy` and
  `stream(ref, messages, settings, seed) -> Iterator[str]`; `loaded() -> list[str]`. Created in
  `build_app` and handed to the tabs that chat.
- `CHECKPOINT_PREFIX`, `load_model(ref, store, engine)`: how a ref is loaded; `memory_budget()`: the
  cache's default memory size (half the machine's memory).

An intermediate PPO checkpoint is not an artifact and must never become `ppo:latest`, so it is listed
from its run folder with a stage of its own (`ppo-checkpoint`) and a ref of its own
(`checkpoint:<folder>`). It holds only the trained tensors (`policy.safetensors`: the LoRA adapter, or
every weight) and the run's resolved config in `state.json`, which names the SFT artifact the policy
started from, the LoRA settings and `policy_layers`: the policy is rebuilt from those here, from files,
without importing the PPO stage.

One engine decodes one conversation at a time (the CPU engines keep their KV cache in the engine), so
the tabs stream through `ModelCache.stream`, which holds that model's lock for the whole reply; two
people chatting with the same model take turns, two with different models do not wait for each other.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.chat import Message, stop_token_ids
from pipeline.checkpoints import checkpoint_step, checkpoints, load_trainable
from pipeline.generation import LoadedPolicy, SamplingSettings, load_policy, make_engine
from pipeline.models import (
    LoraSettings,
    ModelError,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    resolve_model,
)
from pipeline.scoring import LoadedRewardModel, load_reward
from pipeline.store import Artifact, ArtifactStore

MODEL_STAGES = ("base", "sft", "ppo")
CHECKPOINT_STAGE = "ppo-checkpoint"
CHECKPOINT_PREFIX = "checkpoint:"
STATE_FILE = "state.json"
POLICY_FILE = "policy.safetensors"

# The metric a stage's artifact is best judged by, first found wins (stages put their headline first too).
HEADLINES = {
    "sft": ("eval_loss", "train_loss"),
    "reward": ("eval_accuracy", "train_loss"),
    "ppo": ("eval_win_rate_final", "eval_score_final", "train_score_final"),
}


@dataclass(frozen=True)
class ModelEntry:
    """One model the chat and arena tabs offer."""

    ref: str
    """What to load it by: an artifact id, or `checkpoint:<folder>` for a PPO run's checkpoint."""
    stage: str
    """base, sft, ppo, reward, or ppo-checkpoint."""
    id: str
    """The artifact id, or `<run folder name>/checkpoint-<step>`."""
    created: datetime
    """When it was published (a checkpoint: when it was written), UTC."""
    headline: str
    """The one metric that says most about it, as text (empty when there is none)."""

    @property
    def label(self) -> str:
        """One line for a dropdown: stage, id, date, metric."""
        parts = [self.stage, self.id, f"{self.created:%Y-%m-%d %H:%M}"]
        return " · ".join(parts + ([self.headline] if self.headline else []))

    @property
    def provenance(self) -> str:
        """What a generated reply records as its maker: the artifact id, or the checkpoint's ref."""
        return self.ref


def list_models(store: ArtifactStore, run_dirs: Sequence[Path] = ()) -> list[ModelEntry]:
    """Every chat model in the store and every complete checkpoint of its PPO runs, newest first."""
    artifacts = [a for a in store.list() if a.stage in MODEL_STAGES]
    entries = [artifact_entry(a) for a in artifacts]
    folders = [Path(a.meta["run_dir"]) for a in artifacts if a.stage == "ppo" and a.meta.get("run_dir")]
    entries += checkpoint_entries([*folders, *map(Path, run_dirs)])
    return sorted(entries, key=lambda e: (e.created, e.id), reverse=True)


def list_reward_models(store: ArtifactStore) -> list[ModelEntry]:
    """The reward artifacts, newest first."""
    return [artifact_entry(a) for a in reversed(store.list("reward"))]


def artifact_entry(artifact: Artifact) -> ModelEntry:
    return ModelEntry(
        ref=artifact.id,
        stage=artifact.stage,
        id=artifact.id,
        created=parse_time(artifact.manifest.get("created", "")),
        headline=headline(artifact.stage, artifact.metrics),
    )


def headline(stage: str, metrics: dict[str, Any]) -> str:
    for name in HEADLINES.get(stage, ()):
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name} {value:.4g}"
    return ""


def parse_time(created: str) -> datetime:
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:  # a hand-made manifest: sort it last rather than refuse the whole list
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def checkpoint_entries(run_dirs: Sequence[Path]) -> list[ModelEntry]:
    """The complete checkpoints of each run folder (a folder named twice is listed once)."""
    entries = []
    for run_dir in dict.fromkeys(p.resolve() for p in run_dirs):
        for folder in checkpoints(run_dir):
            if not (folder / STATE_FILE).is_file() or not (folder / POLICY_FILE).is_file():
                continue  # an SFT or reward run's checkpoint: not a PPO policy this module can rebuild
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
            trained = [row for row in state.get("history", []) if "score" in row]
            entries.append(
                ModelEntry(
                    ref=f"{CHECKPOINT_PREFIX}{folder}",
                    stage=CHECKPOINT_STAGE,
                    id=f"{run_dir.name}/checkpoint-{checkpoint_step(folder)}",
                    created=datetime.fromtimestamp((folder / STATE_FILE).stat().st_mtime, timezone.utc),
                    headline=f"score {trained[-1]['score']:.4g}" if trained else "",
                )
            )
    return entries


# -- loading ---------------------------------------------------------------------------------------------


def load_model(ref: str, store: ArtifactStore, engine: str = "auto") -> LoadedPolicy:
    """A ModelEntry's ref as a policy ready to answer: an artifact (or any model source), or a checkpoint."""
    if ref.startswith(CHECKPOINT_PREFIX):
        return load_checkpoint(Path(ref[len(CHECKPOINT_PREFIX) :]), store, engine=engine, ref=ref)
    return load_policy(ref, store, engine=engine)


def load_checkpoint(
    folder: Path, store: ArtifactStore, *, engine: str = "auto", ref: str = ""
) -> LoadedPolicy:
    """A PPO checkpoint's policy: the SFT model its run started from, the run's adapter layout, the trained
    tensors loaded into it and merged (see the module doc)."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise ModelError(f"{folder} is not a PPO checkpoint (no {STATE_FILE}); it may have been pruned")
    config = json.loads(state_file.read_text(encoding="utf-8")).get("config") or {}
    if "policy" not in config:
        raise ModelError(f"{state_file} does not record its run's config: written by an older version")
    resolved = resolve_model(config["policy"], store)
    tokenizer = load_tokenizer(resolved.path)
    lm = load_causal_lm(resolved, store)
    match_vocab(lm, tokenizer)
    lora = LoraSettings(**config.get("lora", {"enabled": False}))
    if lora.enabled:
        top, depth = config.get("policy_layers", 0), lm.config.num_hidden_layers
        lm = apply_lora(lm, lora, layers=list(range(depth - top, depth)) if top else None)
    # The stage saved the trainable tensors of its policy module, whose causal LM is its attribute `lm`.
    load_trainable(nn.ModuleDict({"lm": lm}), folder / POLICY_FILE)
    if lora.enabled:
        lm = lm.merge_and_unload()
    lm = lm.eval()
    sampler = make_engine(engine, lm, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    sampler.sync(lm)
    return LoadedPolicy(ref or f"{CHECKPOINT_PREFIX}{folder}", None, lm, tokenizer, sampler)


def policy_bytes(policy: LoadedPolicy) -> int:
    """Memory a loaded policy holds: its weights, twice for the CPU engines (they keep a packed copy)."""
    weights = sum(t.numel() * t.element_size() for t in [*policy.model.parameters(), *policy.model.buffers()])
    return weights * (1 if policy.engine.name == "hf" else 2)


def memory_budget(share: float = 0.5) -> int:
    """Bytes of loaded models the app's cache may hold: `share` of this machine's physical memory."""
    return int(share * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# -- the cache -------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One cached model and the lock its engine is used under."""

    policy: LoadedPolicy
    size: int
    busy: threading.Lock


class ModelCache:
    """The last few loaded policies, least recently used dropped first.

    Sized by a count (`max_models`) and, optionally, by memory (`max_bytes`, as `policy_bytes` counts it);
    the newest model always stays, even alone over the budget. A model two threads ask for at once is
    loaded once: the second waits for the first's load. A model being streamed when it is dropped
    finishes its reply (the stream holds it) and is freed after.
    """

    def __init__(
        self,
        store: ArtifactStore,
        *,
        max_models: int = 3,
        max_bytes: int | None = None,
        engine: str = "auto",
        loader: Callable[[str], LoadedPolicy] | None = None,
    ) -> None:
        """`loader`: how a ref becomes a policy (default: `load_model` on this store and engine)."""
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self.store = store
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.loader = loader or (lambda ref: load_model(ref, store, engine))
        self.slots: OrderedDict[str, Slot] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()  # guards slots and loading; held only briefly
        self.loading: dict[str, threading.Lock] = {}  # per ref: held while that ref loads

    def get(self, ref: str) -> LoadedPolicy:
        """The policy for `ref`, loaded now or reused."""
        return self.slot(ref).policy

    def loaded(self) -> list[str]:
        """Refs held now, least recently used first."""
        with self.lock:
            return list(self.slots)

    def stream(
        self, ref: str, messages: Sequence[Message], settings: SamplingSettings, seed: int
    ) -> Iterator[str]:
        """The reply of `ref` to `messages` as it grows (LoadedPolicy.stream), with the model to itself."""
        slot = self.slot(ref)
        with slot.busy:
            yield from slot.policy.stream(messages, settings, seed)

    def slot(self, ref: str) -> Slot:
        with self.lock:
            if ref in self.slots:
                self.slots.move_to_end(ref)
                return self.slots[ref]
            load_lock = self.loading.setdefault(ref, threading.Lock())
        with load_lock:
            with self.lock:  # loaded by the thread this one waited for
                if ref in self.slots:
                    self.slots.move_to_end(ref)
                    return self.slots[ref]
            policy = self.loader(ref)  # outside the cache lock: other models stay reachable meanwhile
            slot = Slot(policy, policy_bytes(policy), threading.Lock())
            with self.lock:
                self.slots[ref] = slot
                self.loading.pop(ref, None)
                self.evict()
            return slot

    def evict(self) -> None:
        """Drop least recently used models until the count and memory fit (the newest always stays)."""
        while len(self.slots) > 1 and (
            len(self.slots) > self.max_models
            or (self.max_bytes is not None and sum(s.size for s in self.slots.values()) > self.max_bytes)
        ):
            self.slots.popitem(last=False)


class RewardModels:
    """The reward models the app scores with (chat replies, the arena's leaderboard), each loaded once and
    the last `keep` kept. `lock` guards the loading; callers hold it while scoring, too, so that one
    reward model scores at a time."""

    def __init__(self, store: ArtifactStore, keep: int = 2):
        self.store = store
        self.keep = keep
        self.loaded: dict[str, LoadedRewardModel] = {}
        self.lock = threading.RLock()

    def get(self, ref: str) -> LoadedRewardModel:
        with self.lock:
            if ref not in self.loaded:
                self.loaded[ref] = load_reward(ref, self.store)
                while len(self.loaded) > self.keep:
                    self.loaded.pop(next(iter(self.loaded)))
            return self.loaded[ref]
