"""The app (`rlhf app`) and `rlhf label ...`: people rank completions, write demonstrations, chat with any
checkpoint and pit two against each other.

db.py        the SQLite label database: schema, transactions, where it lies, what it refers to
users.py     users, roles and salted password hashes
tasks.py     the task queue: leases, idempotent submissions, undo and discard
imports.py   reading prompt and comparison files into tasks
agreement.py agreement between annotators on the same task (pure functions)
reports.py   progress and queue figures for the Progress and Admin tabs
export.py    `rlhf label export`: the `labels` artifact the stages train on
votes.py     arena votes and chat feedback: two more label kinds
leaderboard.py Bradley-Terry ratings of the arena's models, bootstrap intervals, RM win rates
catalog.py   the models chat and arena offer (artifacts and PPO runs' checkpoints), and their LRU cache
chat_tab.py  the Chat tab: streamed replies, reward scores, regenerate, edit, thumbs, send to ranking
arena.py     the Arena tab: two models on one prompt, names after the vote; its leaderboard
run_logs.py  each run's curves and samples, read from the artifact and its run folder (no Gradio)
runs_tab.py  the Runs tab: artifacts with lineage, curves, a PPO run's samples per step
generate.py  `rlhf label generate`: sample K completions per prompt into ranking tasks
server.py    the Gradio app: login, one tab per task type
session.py   what the tabs share: the app's settings, who is asking, how a refusal is shown
suggest.py   the Write tab's draft replies, streamed from a model
render.py    conversations and ranking tasks as escaped HTML: model output is shown as text, never run
keyboard.js  the Rank tab from the keyboard; style.css, guidelines.md
cli.py       the `rlhf label` and `rlhf app` commands

The app imports pipeline/ only; stages never read the database (they read the exported artifact).
"""
