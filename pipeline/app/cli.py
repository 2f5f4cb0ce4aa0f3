"""`rlhf label ...` and `rlhf app`: parse the command line and call into pipeline.app.

rlhf label users add NAME [--role annotator|admin] [--password-stdin]   asks for a password; salted hash
rlhf label users passwd NAME [--password-stdin]                         set a new password
rlhf label users ls
rlhf label import FILE [--kind auto|prompt|comparison] [--overlap N]     prompts -> writing tasks,
                                                                        comparison groups -> ranking tasks
rlhf label generate --policy REF [--policy REF ...] --prompts FILE [--k 4] [--overlap N]
                    [--max_new_tokens 128] [--temperature 0.7] [--top_p 1.0] [--seed 0] [--engine auto]
rlhf label status                                                       queue and labels per annotator
rlhf label export                                                       publish a `labels` artifact
rlhf label leaderboard [--reward REF] [--samples 1000] [--seed 0]        the arena's Bradley-Terry ratings
rlhf app [--host 127.0.0.1] [--port 7860] [--guidelines FILE] [--lease-minutes 30]
         [--suggest-model REF ...] [--max_new_tokens 256] [--temperature 0.7] [--top_p 0.9] [--seed 0]

Every command takes --store ROOT (default $RLHF_STORE or ./artifacts) and --db PATH (default
<store>/labels.db; required when the store is an S3 URL).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from pipeline.app.db import LabelDB, LabelError, default_db_path, open_db
from pipeline.store import ArtifactStore, code_version, default_store_root


def store_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", default=default_store_root(), help="artifact store root (folder or s3:// URL)"
    )
    common.add_argument("--db", help="label database file (default: labels.db in a local store's root)")
    return common


def database(args: argparse.Namespace) -> LabelDB:
    return open_db(Path(args.db) if args.db else default_db_path(args.store), app_version=code_version())


def label_main(argv: list[str]) -> int:
    common = store_options()
    parser = argparse.ArgumentParser(prog="rlhf label", description="Manage the labelling database.")
    sub = parser.add_subparsers(dest="action", required=True)

    users = sub.add_parser("users", help="add users, set passwords, list them")
    users_sub = users.add_subparsers(dest="users_action", required=True)
    add = users_sub.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--role", default="annotator", choices=["annotator", "admin"])
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd = users_sub.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    users_sub.add_parser("ls", parents=[common], help="list users and roles")

    imports = sub.add_parser("import", parents=[common], help="queue prompts or comparison groups as tasks")
    imports.add_argument("file", help="a prompt or comparison file (any format `rlhf data inspect` reads)")
    imports.add_argument("--kind", default="auto", choices=["auto", "prompt", "comparison"])
    imports.add_argument(
        "--overlap", type=int, default=1, help="labels wanted per task, from distinct annotators"
    )

    generate = sub.add_parser(
        "generate", parents=[common], help="sample K completions per prompt into ranking tasks"
    )
    generate.add_argument("--policy", action="append", required=True, help="model source; repeat for several")
    generate.add_argument(
        "--prompts", required=True, help="prompt file or artifact reference (labels:latest)"
    )
    generate.add_argument(
        "--k", type=int, default=4, help="completions per prompt, shared among the policies"
    )
    generate.add_argument(
        "--overlap", type=int, default=1, help="labels wanted per task, from distinct annotators"
    )
    generate.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top_p", "--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--engine", default="auto", help="sampling engine (pipeline.generation)")
    generate.add_argument("--limit", type=int, help="use only the first N prompts")

    sub.add_parser("status", parents=[common], help="tasks by state and labels per annotator")
    sub.add_parser("export", parents=[common], help="publish the live labels as a `labels` artifact")
    board = sub.add_parser(
        "leaderboard", parents=[common], help="Bradley-Terry ratings of the models in the arena's votes"
    )
    board.add_argument("--reward", help="reward artifact whose verdicts on the same votes are shown beside")
    board.add_argument("--samples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    board.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resampling")

    args = parser.parse_args(argv)
    db = database(args)
    if args.action == "users":
        return users_command(db, args)
    if args.action == "import":
        return import_command(db, args)
    if args.action == "generate":
        from pipeline.app.generate import generate_command

        return generate_command(db, ArtifactStore(args.store), args)
    if args.action == "status":
        return status_command(db)
    if args.action == "leaderboard":
        return leaderboard_command(db, ArtifactStore(args.store), args)
    from pipeline.app.export import export_labels

    artifact = export_labels(db, ArtifactStore(args.store))
    print(f"published {artifact.id}")
    for metric, value in artifact.metrics.items():
        print(f"  {metric}: {value if not isinstance(value, float) else f'{value:.3f}'}")
    return 0


def read_password(name: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise LabelError("no terminal to ask for the password on: pipe it in with --password-stdin")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise LabelError("the two passwords differ; nothing was changed")
    return password


def users_command(db: LabelDB, args: argparse.Namespace) -> int:
    from pipeline.app.users import add_user, list_users, set_password

    if args.users_action == "ls":
        for user in list_users(db):
            print(f"{user.name}\t{user.role}")
        return 0
    password = read_password(args.name, args.password_stdin)
    if args.users_action == "add":
        add_user(db, args.name, args.role, password)
        print(f"added {args.role} {args.name} to {db.path}")
    else:
        set_password(db, args.name, password)
        print(f"set a new password for {args.name}")
    return 0


def import_command(db: LabelDB, args: argparse.Namespace) -> int:
    from pipeline.app.imports import read_tasks
    from pipeline.app.tasks import add_tasks

    new = read_tasks(args.file, args.kind)
    ids = add_tasks(db, new, overlap=args.overlap)
    kinds = {task.kind for task in new}
    what = " and ".join({"rank": "ranking", "write": "writing"}[kind] for kind in sorted(kinds))
    print(f"queued {len(ids)} {what} tasks from {args.file} (overlap {args.overlap}) in {db.path}")
    return 0


def status_command(db: LabelDB) -> int:
    from pipeline.app.reports import progress, queue_summary

    print("tasks by state:")
    for row in queue_summary(db):
        print(
            f"  {row['kind']:<6} {row['tasks']} tasks: {row['waiting']} waiting, {row['in_progress']} in progress, "
            f"{row['done']} done; {row['labels']} of {row['labels_wanted']} labels"
        )
    print("labels per annotator:")
    for row in progress(db):
        print(
            f"  {row['user']:<16} {row['rankings']} rankings, {row['demonstrations']} demonstrations, "
            f"{row['prompts']} prompts, {row['undone']} undone, {row['discarded']} discarded"
        )
    return 0


def leaderboard_command(db: LabelDB, store: ArtifactStore, args: argparse.Namespace) -> int:
    from pipeline.app.leaderboard import agreement, blind, format_table, leaderboard, rm_verdicts
    from pipeline.app.votes import arena_votes

    if args.samples < 1:
        raise LabelError(f"--samples must be at least 1, got {args.samples}")
    every_vote = arena_votes(db)
    votes = blind(every_vote)
    named = len(every_vote) - len(votes)
    if not votes:
        kept = f" ({named} named-mode votes, which are not rated)" if named else ""
        print(f"no anonymous arena votes in {db.path} yet{kept}: vote in the app's Arena tab (`rlhf app`)")
        return 0
    rm_scores = None
    if args.reward:
        from pipeline.scoring import load_reward

        rm_scores = rm_verdicts(votes, load_reward(args.reward, store))
    standings = leaderboard(votes, rm_scores=rm_scores, samples=args.samples, seed=args.seed)
    print(format_table(standings))
    print(f"{len(votes)} votes; ratings on the Elo scale (1000: the mean model), 95% bootstrap intervals")
    if named:
        print(f"{named} named-mode votes are not rated: their voters saw the models' names first")
    if rm_scores is not None:
        agreed, decisive = agreement(votes, rm_scores)
        if decisive:
            print(
                f"the reward model {args.reward} agrees with {agreed} of {decisive} decisive votes ({agreed / decisive:.0%})"
            )
    return 0


def app_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf app", parents=[store_options()], description="Serve the labelling app."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--guidelines", help="Markdown file shown beside every task (default: the demo's)")
    parser.add_argument("--lease-minutes", type=float, default=30.0, help="how long a task stays reserved")
    parser.add_argument(
        "--suggest-model", action="append", default=[], help="model the Write tab drafts with"
    )
    parser.add_argument("--engine", default="auto", help="sampling engine for suggestions")
    parser.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=256, help="suggestion length"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="suggestion sampling temperature")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.9, help="suggestion nucleus sampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the suggestions' draws")
    parser.add_argument(
        "--max-models", type=int, default=3, help="models chat and arena keep loaded (least recently used go)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per reply (default 1: people chatting at once then stream on cores of their own)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise LabelError(f"--threads must be at least 1, got {args.threads}")
    # A decode step of a small model is hundreds of short parallel calls: with cores shared by other
    # replies or jobs, each waits for a descheduled thread (bench/RESULTS.md, the chat path), while one
    # thread per reply keeps every reply streaming.
    import torch

    torch.set_num_threads(args.threads)
    if args.max_models < 1:
        raise LabelError(f"--max-models must be at least 1, got {args.max_models}")
    from pipeline.app.server import launch
    from pipeline.app.session import AppSettings

    settings = AppSettings(
        db=database(args),
        store=ArtifactStore(args.store),
        lease_seconds=args.lease_minutes * 60,
        suggest_models=args.suggest_model,
        engine=args.engine,
        suggest_sampling={
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
        },
        seed=args.seed,
        max_models=args.max_models,
    )
    if args.guidelines:
        try:
            settings.guidelines = Path(args.guidelines).read_text(encoding="utf-8")
        except OSError as err:
            raise LabelError(f"cannot read the guidelines {args.guidelines}: {err.strerror}") from None
    print(f"label database: {settings.db.path}")
    launch(settings, host=args.host, port=args.port)
    return 0
