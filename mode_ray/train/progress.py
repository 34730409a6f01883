"""Training progress for the terminal: the workers of every job report to one small Ray actor (`ProgressBoard`),
and `mode-ray train ...` draws one progress bar per job from it (loss, images/s, ETA), then a one-line summary
per job. Without a board (a job run by other code), rank 0 prints a log line every `log_every` steps instead."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

NAMESPACE = "mode_ray"


class ProgressBoard:
    """Ray actor body: the latest fields reported by each job (step, steps, loss, images_per_s, elapsed_s, and
    `done` / `path` once its checkpoint is written)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def update(self, job: str, fields: dict[str, Any]) -> None:
        self.jobs[job] = {**self.jobs.get(job, {}), **fields}

    def read(self) -> dict[str, dict[str, Any]]:
        return self.jobs


def report(board: str | None, job: str, fields: dict[str, Any]) -> bool:
    """Send `fields` of `job` to the board named `board` (fire and forget); False when there is none."""
    if board is None:
        return False
    import ray

    try:
        ray.get_actor(board, namespace=NAMESPACE).update.remote(job, fields)
    except ValueError:  # the board is gone (the driver stopped): nothing to draw on
        return False
    return True


def summary_line(job: str, f: dict[str, Any]) -> str:
    where = f" -> {f['path']}" if f.get("path") else ""
    return (
        f"{job}: {f.get('step', 0)}/{f.get('steps', '?')} steps, loss {f.get('loss', float('nan')):.4f} (EMA), "
        f"{f.get('images_per_s', 0):.0f} img/s, {f.get('elapsed_s', 0):.1f} s{where}"
    )


@contextmanager
def progress_bars(echo: Any = print) -> Iterator[str]:
    """A ProgressBoard for the jobs started inside the block (yields its name for `JobConfig.progress`), drawn
    as rich progress bars on stderr while they run; then one summary line per job through `echo`."""
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    name = f"mode-ray-progress-{uuid.uuid4().hex[:8]}"
    board = ray.remote(ProgressBoard).options(name=name, namespace=NAMESPACE, num_cpus=0).remote()
    ray.get(board.read.remote())  # started before any job reports to it
    stop = threading.Event()
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[rate]} img/s"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def draw() -> None:
        while not stop.is_set():
            try:
                jobs = ray.get(board.read.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a slow poll: draw next time
                jobs = {}
            for job, f in jobs.items():
                loss, rate = f"{f.get('loss', float('nan')):.4f}", f"{f.get('images_per_s', 0):.0f}"
                if job not in tasks:
                    tasks[job] = bars.add_task(job, total=f.get("steps"), loss=loss, rate=rate)
                bars.update(tasks[job], completed=f.get("step", 0), loss=loss, rate=rate)
            stop.wait(0.5)

    thread = threading.Thread(target=draw, daemon=True)
    with bars:
        thread.start()
        try:
            yield name
        finally:
            stop.set()
            thread.join()
    for job, f in sorted(ray.get(board.read.remote()).items()):
        echo(summary_line(job, f))
    ray.kill(board)
