"""`rlhf`: parse the command line and call a stage's `run(cfg, store)` or a pipeline tool. Nothing else.

rlhf sft     --config FILE [--key value ...]     stage 1: supervised fine-tuning
rlhf reward  --config FILE [--key value ...]     stage 2: reward model on ranked comparisons
rlhf reward score --artifact REF (--prompt P --completion C ... | --file F)
rlhf ppo     --config FILE [--key value ...]     stage 3: PPO against the reward model
rlhf ppo report REF                              did it help: eval curves, proxy vs judge, replies side by side
rlhf run     --config FILE [--store ROOT] [--sft.key value ...]   all three stages as one resumable job
rlhf artifacts ls [--store ROOT] [--stage S]     published artifacts
rlhf artifacts show REF [--store ROOT]           one artifact: lineage, metrics, config
rlhf artifacts export REF --out DIR [--adapter --base NAME]   a standalone Hugging Face folder
rlhf artifacts rm REF [--with-dependants] [--with-runs] [--dry-run] [--db PATH]
rlhf artifacts gc [--keep-days N] [--with-runs] [--dry-run]   old artifacts, checkpoints, unfinished folders
rlhf data inspect FILE [--kind K] [--format F]   counts, K and length distributions, problems (exit 1)
rlhf label users|import|generate|status|export   the label database (`rlhf label --help`)
rlhf app [--host H] [--port P]                   the labelling app, login required
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.store import default_store_root, is_url

# Each stage module exposes `Config` (a dataclass with a `store` field) and `run(cfg, store) -> Artifact`.
STAGE_MODULES = {
    "sft": "stages.sft.train",
    "reward": "stages.reward.train",
    "ppo": "stages.ppo.train",
}
DEFAULT_STORE = default_store_root()


class UsageError(UserError, ValueError):
    """A command line that cannot be run as given."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UsageError: one line naming the problem and where help is."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; `{self.prog} --help` lists the arguments")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "reward" and rest[:1] == ["score"]:
            return importlib.import_module("stages.reward.score").main(rest[1:])
        if command == "ppo" and rest[:1] == ["report"]:
            return importlib.import_module("stages.ppo.report").main(rest[1:])
        if command in STAGE_MODULES:
            return run_stage(command, rest)
        if command == "run":
            return run_job_command(rest)
        if command == "artifacts":
            return artifacts_command(rest)
        if command == "data":
            return data_command(rest)
        if command in ("label", "app"):
            from pipeline.app import cli as app_cli

            return app_cli.label_main(rest) if command == "label" else app_cli.app_main(rest)
        raise UsageError(f"unknown command {command!r}; run `rlhf --help` for the list")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the user gets one line naming the problem, not a traceback
        if not is_user_error(err) or os.environ.get("RLHF_DEBUG"):
            raise
        # One line, even when a message quotes a library's paragraph.
        print(
            "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()),
            file=sys.stderr,
        )
        return 2


def is_user_error(err: Exception) -> bool:
    """Errors our own code raises with a message meant for the user (bad config, data, reference)."""
    return isinstance(err, UserError)


def run_stage(name: str, argv: list[str]) -> int:
    from pipeline.artifacts_view import format_value
    from pipeline.store import ArtifactStore

    parser = Parser(prog=f"rlhf {name}", description=f"Run the {name} stage.")
    parser.add_argument("--config", help="YAML config file; any --key value after it overrides a key")
    args, overrides = parser.parse_known_args(argv)
    module = importlib.import_module(STAGE_MODULES[name])
    cfg = load_config(module.Config, args.config, overrides)
    artifact = module.run(cfg, ArtifactStore(cfg.store))
    if artifact is not None:
        print(f"published {artifact.id}")
        # The headline figures, so a finished job says whether it worked without a second command.
        for metric, value in artifact.metrics.items():
            if isinstance(value, (int, float)):
                print(f"  {metric}: {format_value(value)}")
    return 0


def run_job_command(argv: list[str]) -> int:
    from pipeline.job import run_job

    parser = Parser(prog="rlhf run", description="SFT, reward and PPO as one resumable job.")
    parser.add_argument("--config", required=True, help="job file, e.g. configs/pipeline-demo.yaml")
    args, overrides = parser.parse_known_args(argv)
    run_job(args.config, overrides, STAGE_MODULES)
    return 0


def artifacts_command(argv: list[str]) -> int:
    from pipeline.artifacts_view import render_list, render_show
    from pipeline.store import ArtifactStore

    parser = Parser(prog="rlhf artifacts")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="list published artifacts, oldest first")
    ls.add_argument("--store", default=DEFAULT_STORE)
    ls.add_argument("--stage")
    show = sub.add_parser("show", help="one artifact: lineage, metrics, config")
    show.add_argument("ref", help="artifact id, <stage>:latest, or a path")
    show.add_argument("--store", default=DEFAULT_STORE)
    export = sub.add_parser("export", help="a standalone Hugging Face folder: adapters merged, or --adapter")
    export.add_argument("ref", help="artifact id, <stage>:latest, or a path")
    export.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    export.add_argument("--adapter", action="store_true", help="keep the adapter; load it on --base")
    export.add_argument("--base", help="Hub id or folder the exported adapter loads on")
    export.add_argument("--store", default=DEFAULT_STORE)
    rm = sub.add_parser("rm", help="remove an artifact; refused while others depend on it")
    rm.add_argument("ref", help="artifact id or <stage>:latest")
    rm.add_argument("--with-dependants", action="store_true", help="also remove what was built from it")
    gc = sub.add_parser("gc", help="remove old artifacts nothing needs, checkpoints of finished runs, ...")
    gc.add_argument("--keep-days", type=float, default=30.0, help="keep every artifact younger than this")
    for command in (rm, gc):
        command.add_argument(
            "--with-runs", action="store_true", help="also remove their run folders (curves)"
        )
        command.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
        command.add_argument("--store", default=DEFAULT_STORE)
        command.add_argument(
            "--db", help="label database whose artifacts to keep (default: labels.db in the store)"
        )
    args = parser.parse_args(argv)
    store = ArtifactStore(args.store)
    if args.action == "ls":
        print(render_list(store.list(args.stage)))
    elif args.action == "show":
        print(render_show(store, store.resolve(args.ref)))
    elif args.action == "export":
        from pipeline.export import export_artifact

        out = export_artifact(store, args.ref, args.out, adapter=args.adapter, base=args.base)
        print(f"exported {args.ref} to {out}")
    else:
        return cleanup_command(args, store)
    return 0


def cleanup_command(args: argparse.Namespace, store) -> int:
    from pipeline.cleanup import execute, plan_gc, plan_rm, render_plan

    references = label_references(args.store, args.db)
    if args.action == "rm":
        plan = plan_rm(
            store,
            args.ref,
            references=references,
            with_dependants=args.with_dependants,
            with_runs=args.with_runs,
        )
    else:
        plan = plan_gc(store, references=references, keep_days=args.keep_days, with_runs=args.with_runs)
    print(render_plan(plan, dry_run=args.dry_run))
    if not args.dry_run:
        execute(store, plan)
    return 0


def label_references(store_root: str, db: str | None) -> dict[str, list[str]]:
    """Artifact id -> what in the label database needs it (generated completions, arena models)."""
    from pipeline.app.db import artifact_references, default_db_path

    if db is None and is_url(store_root):
        print(
            "note: no label database checked (pass --db PATH to keep the artifacts it refers to)",
            file=sys.stderr,
        )
        return {}
    return artifact_references(Path(db) if db else default_db_path(store_root))


def data_command(argv: list[str]) -> int:
    from pipeline.datasets import inspect_file

    parser = Parser(prog="rlhf data")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="counts, K distribution, token lengths and the first problems")
    inspect.add_argument("file", help="a JSONL/JSON/gzip/Parquet file, or a Hub dataset name")
    inspect.add_argument("--kind", choices=["conversation", "comparison", "prompt"])
    inspect.add_argument(
        "--format", default="auto", help="auto, canonical, hh-rlhf, trl, sharegpt, alpaca, oasst"
    )
    inspect.add_argument(
        "--tokenizer", help="model source whose tokenizer measures lengths (default: none, characters)"
    )
    inspect.add_argument("--store", default=DEFAULT_STORE, help="artifact store used to resolve --tokenizer")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer not in (None, "none"):
        from pipeline.models import load_tokenizer, resolve_model
        from pipeline.store import ArtifactStore

        tokenizer = load_tokenizer(resolve_model(args.tokenizer, ArtifactStore(args.store)).path)
    report = inspect_file(args.file, args.kind, format=args.format, tokenizer=tokenizer)
    print(report.render())
    return 1 if report.dropped else 0  # scripts can gate on a clean file


if __name__ == "__main__":
    sys.exit(main())
