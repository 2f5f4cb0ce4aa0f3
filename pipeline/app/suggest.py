"""Draft replies for the Write tab, streamed from a chosen model through pipeline.generation.

A model is loaded the first time someone asks it for a suggestion and kept for the life of the app
(one per model source; the app is started with the few it offers). Loading and sampling hold a lock:
one suggestion at a time uses every core, and two would only slow each other down.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.store import ArtifactStore


class Suggester:
    """Loaded models by source, and the lock that serialises their use."""

    def __init__(
        self,
        store: ArtifactStore,
        engine: str = "auto",
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.sampling = sampling or {}
        self.seeds = random.Random(seed)  # each suggestion draws afresh; the sequence is fixed by `seed`
        self.policies: dict[str, Any] = {}
        self.lock = threading.Lock()

    def stream(self, source: str, messages: list[dict]) -> Iterator[str]:
        """The growing reply of `source` to `messages`."""
        from pipeline.generation import SamplingSettings, load_policy

        with self.lock:
            if source not in self.policies:
                self.policies[source] = load_policy(source, self.store, engine=self.engine)
            policy = self.policies[source]
            settings = SamplingSettings(**self.sampling)
            yield from policy.stream(messages, settings, seed=self.seeds.randrange(2**31))

    def provenance(self, source: str) -> str:
        """What a suggestion from `source` is recorded as: its artifact id, else the source as given."""
        return self.policies[source].artifact_id or source
