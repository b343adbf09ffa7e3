"""Running tasks on Ray: the task runner a flow opens, and fan-out over shards with per-task resources.

One Ray instance serves a whole run: the first `ray_runner` entered connects to the configured cluster (or
starts a local instance) and later ones, in subflows, reuse it. Each shard is one Prefect task run on Ray with
the stage's `Resources`; the flow waits for all of them, so one failing shard never stops the others: they
finish, and a re-run redoes only what failed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prefect.futures import as_completed
from prefect.tasks import Task
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options
from tqdm.auto import tqdm

from tasks.config import RayConfig, Resources


class ShardsFailed(RuntimeError):
    """Some tasks of a shard-parallel stage failed; the others completed and are kept."""


def ray_runner(config: RayConfig) -> RayTaskRunner:
    """A RayTaskRunner on the configured cluster, or a local instance (enter it with `with`)."""
    return RayTaskRunner(address=config.resolved_address(), init_kwargs=config.init_kwargs())


_SESSION: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pixart_ray_session", default=None)


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[Callable[[], RayTaskRunner]]:
    """Yields `runner()`: the run's RayTaskRunner, entered on first call and exited when the outermost block ends.

    Flows nest (the pipeline calls the stage flows); they share one runner, and a run whose every step is
    reused never starts Ray at all.
    """
    if (session := _SESSION.get()) is not None:
        yield session["get"]
        return
    stack = contextlib.ExitStack()
    session = {}

    def get() -> RayTaskRunner:
        if "runner" not in session:
            session["runner"] = stack.enter_context(ray_runner(config))
        return session["runner"]

    session["get"] = get
    token = _SESSION.set(session)
    try:
        with stack:
            yield get
    finally:
        _SESSION.reset(token)


def run_on_ray(
    runner: RayTaskRunner,
    task: Task,
    parameters: Sequence[dict[str, Any]],
    resources: Resources,
    names: Sequence[str] | None = None,
    desc: str | None = None,
) -> list[Any]:
    """Run `task` once per parameter dict on Ray with `resources` each; results in the order given.

    Waits for every task. If any failed, raises ShardsFailed naming each with its error, after the others
    have finished (their outputs are complete and a re-run reuses them).
    """
    names = list(names) if names is not None else [str(i) for i in range(len(parameters))]
    if not parameters:
        return []
    options = {"num_cpus": resources.num_cpus} | ({"num_gpus": resources.num_gpus} if resources.num_gpus else {})
    with remote_options(**options):
        futures = [runner.submit(task, params) for params in parameters]
    index = {future.task_run_id: i for i, future in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    failures: list[str] = []
    with tqdm(total=len(futures), desc=desc or task.name, unit="task", disable=None) as bar:
        for future in as_completed(futures):
            i = index[future.task_run_id]
            try:
                results[i] = future.result()
            except Exception as err:  # reported together below, once every other task has finished
                failures.append(f"{names[i]}: {type(err).__name__}: {err}")
            bar.update(1)
    if failures:
        raise ShardsFailed(
            f"{len(failures)} of {len(futures)} {task.name} tasks failed (the other {len(futures) - len(failures)} "
            "are complete and will be reused when this runs again):\n  " + "\n  ".join(failures)
        )
    return results
