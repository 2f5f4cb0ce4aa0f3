"""Time from submitting a ranking to the next task shown, through gradio_client, with 20 annotators at once.

The app runs as `rlhf app` in its own process, at its stated concurrency settings (pipeline/app/server.py:
database events on up to 8 threads). Twenty simulated annotators, one gradio_client each (logged in),
rank tasks from the demo comparisons (K = 2 to 4): each call is one press of Submit, and it returns
with the next task's content, so its wall time is what an annotator waits. Between submits each
annotator "reads" for a random think time (`--think MIN MAX` seconds; 0 0 is the worst case, everyone
submitting back to back).

The peer, in the same run: a Gradio app whose only event returns its input (same queue settings),
called the same way by twenty logged-in clients. Its latency is the floor of Gradio and gradio_client themselves
(gradio_client polls for results every 50 ms); the ratio says what the app adds on top.

    .venv/bin/python bench/label_app.py                       # think 1-3 s, 2 rounds of 10 submits each
    .venv/bin/python bench/label_app.py --think 0 0           # everyone submitting back to back

Prints median and p95 of both, then `p95 ratio: <app / echo>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.app.db import open_db  # noqa: E402
from pipeline.app.tasks import Completion, NewTask, add_tasks  # noqa: E402
from pipeline.app.users import add_user  # noqa: E402
from pipeline.datasets import load_records  # noqa: E402

ANNOTATORS = 20  # the figure; --annotators 1 gives the floor without contention
ECHO_APP = """
import sys
import gradio as gr
from pipeline.app.server import DB_CONCURRENCY
with gr.Blocks() as app:
    box = gr.Textbox()
    gr.Button().click(lambda *values: values, [box] * 20, [box] * 20, api_name="echo")
app.queue(default_concurrency_limit=DB_CONCURRENCY)
app.launch(server_port=int(sys.argv[1]), ssr_mode=False, quiet=True, auth=lambda user, password: True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port}")


def cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU time a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_clients(url: str, work, submits: int, think: tuple[float, float], annotators: int) -> list[float]:
    """One thread per annotator, each its own client, each timing `submits` calls of `work(client, state)`."""
    from gradio_client import Client

    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(annotators)

    def annotator(i: int) -> None:
        rng = random.Random(i)
        client = Client(url, auth=(f"a{i:02d}", f"password-{i:02d}"), verbose=False, download_files=False)
        state = work(client, None)  # the first task shown: not timed
        start.wait()
        mine = []
        for _ in range(submits):
            time.sleep(rng.uniform(*think))
            began = time.perf_counter()
            state = work(client, state)
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def rank_next(client, shown):
    """Submit a ranking of the task on screen (or open the first one); returns the next task shown."""
    if shown is None:
        return client.predict(api_name="/next_ranking")
    key, k = shown[-1], shown[1].count('class="rank-slot"')
    answer = json.dumps({"tiers": [1 + i % 2 for i in range(k)], "flags": [[] for _ in range(k)]})
    *following, _undo_key = client.predict(key, answer, "", api_name="/submit_ranking")
    assert following[0].startswith("Saved"), following[0]
    return following


def echo(client, _state):
    return client.predict(*(["x"] * 20), api_name="/echo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--think", nargs=2, type=float, default=[1.0, 3.0], metavar=("MIN", "MAX"))
    parser.add_argument("--submits", type=int, default=10, help="timed submits per annotator and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each; the order alternates (ABBA)")
    parser.add_argument("--annotators", type=int, default=ANNOTATORS, help="simulated annotators at once")
    args = parser.parse_args()
    env = os.environ | {"PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        db = open_db(store / "labels.db", app_version="bench")
        for i in range(args.annotators):
            add_user(db, f"a{i:02d}", "annotator", f"password-{i:02d}")
        groups = load_records(REPO / "data" / "demo" / "comparisons.jsonl", "comparison").records
        wanted = args.annotators * (args.rounds * (args.submits + 1) + 1)
        add_tasks(
            db,
            [
                NewTask("rank", g["prompt"], f"demo:{i}", [Completion(c) for c in g["completions"]])
                for i, g in zip(range(wanted), (groups * (wanted // len(groups) + 1)), strict=False)
            ],
        )
        port, echo_port = free_port(), free_port()
        app = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "app", "--store", str(store), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peer = subprocess.Popen(
            [sys.executable, "-c", ECHO_APP, str(echo_port)], env=env, stdout=subprocess.DEVNULL, cwd=REPO
        )
        try:
            wait_for(port, app)
            wait_for(echo_port, peer)
            ours, floor, cpu = [], [], {"app": 0.0, "echo": 0.0}
            for round_ in range(args.rounds):
                sides = [("app", port, rank_next, ours), ("echo", echo_port, echo, floor)]
                for name, side_port, work, times in sides if round_ % 2 == 0 else sides[::-1]:
                    server = app if name == "app" else peer
                    before = cpu_seconds(server)
                    url = f"http://127.0.0.1:{side_port}"
                    times += run_clients(url, work, args.submits, tuple(args.think), args.annotators)
                    cpu[name] += cpu_seconds(server) - before
            # Server CPU per timed call, logins and first tasks included: what one submit costs the server.
            server_cpu = [cpu["app"] / len(ours) * 1000, cpu["echo"] / len(floor) * 1000]
        finally:
            app.terminate()
            peer.terminate()
            app.wait()
            peer.wait()

    def line(name: str, values: list[float]) -> str:
        median, p95 = statistics.median(values) * 1000, percentile(values, 95) * 1000
        return f"{name:<34} n={len(values):<4} median {median:6.1f} ms   p95 {p95:6.1f} ms"

    think = f"{args.think[0]:g}-{args.think[1]:g} s"
    print(
        f"{args.annotators} annotators, think {think}, {args.rounds} rounds of {args.submits} submits each per side"
    )
    print(line("submit -> next task (the app)", ours) + f"   server CPU {server_cpu[0]:.1f} ms/call")
    print(line("echo (Gradio + gradio_client)", floor) + f"   server CPU {server_cpu[1]:.1f} ms/call")
    print(json.dumps({"median_ms": statistics.median(ours) * 1000, "p95_ms": percentile(ours, 95) * 1000}))
    print(f"p95 ratio: {percentile(ours, 95) / percentile(floor, 95):.2f}")


if __name__ == "__main__":
    main()
