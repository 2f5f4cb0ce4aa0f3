"""`rlhf artifacts export`: a model artifact as a folder any Hugging Face user can load without this package.

Merged (the default): the artifact loaded as the stages load it, every adapter down its lineage merged
into the weights, saved with `save_pretrained`: the tokenizer with its chat template, a model card, and
for a policy a `generation_config.json` whose `eos_token_id` lists the stop tokens the stages sample with.
A reward model is saved as a one-output `AutoModelForSequenceClassification`, its normalisation
(`reward_mean`, `reward_std`, `reward_bias`) in `config.json`.

The pad trap: a transformers sequence classifier scores the last token that is not `config.pad_token_id`.
Base configs (SmolLM2's among them) set that to the end-of-turn token, which is the very token the reward
is read at; a reward artifact trained as an adapter keeps its base's config. So the export writes the
tokenizer's own pad id, which pipeline.chat keeps distinct from EOS, into the config (giving the tokenizer
a pad of its own if its pad is one of the stop tokens).

`--adapter`: the artifact's own adapter files, with `base_model_name_or_path` naming the base it was
trained on: `--base` (a Hub id or folder), or the base the artifact records when that is a Hub id or a
folder. A PPO adapter sits on an SFT artifact, not on a Hub model: export that one first and name it.

The folder is built under a hidden name beside `--out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline.chat import FALLBACK_PAD, stop_token_ids
from pipeline.model_card import CURVE_FILE, README, Packaging, model_card, read_curve
from pipeline.models import (
    ModelError,
    ResolvedModel,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    read_card,
)
from pipeline.store import Artifact, ArtifactStore, StoreError

ADAPTER_CONFIG = "adapter_config.json"


def export_artifact(
    store: ArtifactStore, ref: str, out: str | Path, *, adapter: bool = False, base: str | None = None
) -> Path:
    """Write artifact `ref` to the new folder `out`, merged or (`adapter`) as its adapter on `base`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"--out {out} already exists and is not an empty folder; name a new folder")
    if base is not None and not adapter:
        raise ModelError("--base names the base an exported adapter loads on: add --adapter, or drop --base")
    artifact = store.resolve(ref)
    folder = store.local_path(artifact)
    card = read_card(folder)
    if not card and not (folder / "config.json").is_file():
        raise ModelError(
            f"{artifact.id} is a {artifact.stage!r} artifact with no model in it; nothing to export"
        )
    staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        if adapter:
            base = write_adapter(artifact, folder, card, store, staging, base)
        else:
            write_merged(artifact, folder, card, store, staging)
        packaging = Packaging("adapter", base) if adapter else Packaging("merged")
        manifest = artifact.manifest
        model_card(
            artifact.stage,
            config=manifest.get("config", {}),
            inputs=manifest.get("inputs", []),
            metrics=artifact.metrics,
            meta=artifact.meta,
            model=card,
            curve=read_curve(folder / CURVE_FILE),
            store=store,
            packaging=packaging,
        ).save(staging / README)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_merged(artifact: Artifact, folder: Path, card: dict, store: ArtifactStore, target: Path) -> None:
    """The model with every adapter of its lineage merged, its tokenizer, and the configs that make it load right."""
    tokenizer = load_tokenizer(str(folder))
    stops = stop_token_ids(tokenizer)
    give_pad_of_its_own(tokenizer, stops)
    resolved = ResolvedModel(str(folder), {"artifact": artifact.id}, card)
    if card.get("kind") == "reward":
        model = load_reward_model(resolved, store)
        model.config.update(
            {key: card[key] for key in ("reward_mean", "reward_std", "reward_bias")}
            | {"id2label": {0: "reward"}, "label2id": {"reward": 0}}
        )
    else:
        model = load_causal_lm(resolved, store)
        model.generation_config.update(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def give_pad_of_its_own(tokenizer: PreTrainedTokenizerBase, stops: list[int]) -> None:
    """A pad token that is no stop token, so nothing the model reads or writes is mistaken for padding."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
        tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD})


def write_adapter(
    artifact: Artifact, folder: Path, card: dict, store: ArtifactStore, target: Path, base: str | None
) -> str:
    """The artifact's adapter files with `base_model_name_or_path` set to the named base; returns that base."""
    if card.get("kind") == "reward":
        raise ModelError(
            f"{artifact.id} is a reward model: export it merged (without --adapter); its score head, pad id and "
            "normalisation live in config.json, which an adapter folder does not carry"
        )
    recorded = card.get("adapter_base")
    if not recorded or not (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{artifact.id} holds full weights, not an adapter: export it without --adapter")
    if base is None:
        base = recorded
        if is_artifact(recorded, store):
            raise ModelError(
                f"{artifact.id} is an adapter on artifact {recorded}, which only this pipeline can load: export "
                f"that one first (`rlhf artifacts export {recorded} --out DIR`) and name the folder, or the Hub "
                "repository you upload it to, with --base"
            )
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    for path in folder.glob("adapter_model.*"):
        shutil.copy2(path, target / path.name)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.save_pretrained(target)
    stops = stop_token_ids(tokenizer)
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(target)
    return base


def is_artifact(source: str, store: ArtifactStore) -> bool:
    try:
        store.resolve(source)
    except StoreError:
        return False
    return True
