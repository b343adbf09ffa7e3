"""Running flows from the command line: one Prefect API for the driver and its Ray workers.

With no Prefect server configured, Prefect would start a temporary server in every process that reports a
run, and so in every Ray worker (seconds each, and they race on one SQLite file). `prefect_api` starts one
temporary server for the command instead and points this process at it; task runs shipped to Ray carry its
address. With PREFECT_API_URL set (a server, a worker's flow run, Prefect Cloud) it is used as is.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

from tasks.config import PipelineConfig

FLOWS = ("ingest", "caption", "extract", "train", "evaluate", "pipeline")


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API URL runs report to for the block: the configured one, or a temporary local server's."""
    if url := PREFECT_API_URL.value():
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        server = SubprocessASGIServer()
        server.start()
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                try:
                    yield server.api_url
                finally:  # also after a failure or Ctrl-C: their logs matter most
                    drain_reporting()
        finally:
            server.stop()


def drain_reporting() -> None:
    """Send the logs and events still queued to the server (as prefect_test_harness does before stopping it):
    sent after the server stops, each would be retried for a long time before the process can exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


def run_flow(name: str, config: PipelineConfig, stage: int = 1, model: str | None = None):
    """Run flow `name` (one of FLOWS) on `config`; returns its result (a StageReport, a dict of them, or the
    pipeline's summary). stage: the train flow's stage; model: what the evaluate flow judges (None: the
    config's export)."""
    from flows import pipeline as flows

    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; expected one of {list(FLOWS)}")
    with prefect_api():
        if name == "ingest":
            return flows.ingest(config)
        if name == "caption":
            return flows.caption(config)
        if name == "extract":
            return flows.extract_features(config)
        if name == "train":
            return flows.train(config, stage)
        if name == "evaluate":
            return flows.evaluate(config, model)
        return flows.pipeline(config)
