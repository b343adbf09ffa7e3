"""Running flows from the command line: one Prefect API for the driver and its Ray workers.

With no Prefect server configured, Prefect would start a temporary server in every process that reports a
run, and so in every Ray worker (seconds each, and they race on one SQLite file), and the run history would go
with it. `prefect_api` points the command at the workdir's own local server instead (`flows.server`: started on
demand, reused by later commands, kept running), so the log's links work after the command ends and a command
with nothing to do waits for no server. Task runs shipped to Ray carry its address in their settings context.
A remote workdir (s3://...) with no $PIXART_SERVER_HOME has no local place for the server's state: there a
temporary server serves the one command, as before. With PREFECT_API_URL set (a server, a worker's flow run,
Prefect Cloud) it is used as is.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from prefect.logging import get_logger
from prefect.logging.configuration import ensure_logging_setup
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

from flows.server import HOME_ENV, ServerRecord, ensure_server, running_server, server_home
from tasks.config import PipelineConfig

FLOWS = ("ingest", "caption", "extract", "train", "evaluate", "pipeline")

logger = get_logger("pixart")


@contextlib.contextmanager
def prefect_api(workdir: str) -> Iterator[str]:
    """The Prefect API URL runs report to for the block: the configured one, else the local server of `workdir`
    (started if none runs), else, for a remote workdir, a temporary server's."""
    if url := PREFECT_API_URL.value():
        yield url
        return
    ensure_logging_setup()  # the lines below print as the runs' do, also before a flow module is imported
    if (home := server_home(workdir)) is None:
        logger.info(
            f"workdir {workdir} is not local and {HOME_ENV} is not set: a temporary Prefect server serves this "
            "command (its run history ends with it)"
        )
        with temporary_server() as url:
            yield url
        return
    server, started = ensure_server(home)
    since = "started now" if started else f"up {server.uptime()}"
    logger.info(f"Prefect UI: {server.url} (local server, pid {server.pid}, {since}; state in {home})")
    with reporting_to(server.api_url):
        yield server.api_url


def local_server(workdir: str) -> ServerRecord | None:
    """The workdir's local server if commands report to it and it is running (None with PREFECT_API_URL set)."""
    if PREFECT_API_URL.value() or (home := server_home(workdir)) is None:
        return None
    return running_server(home)


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """A Prefect server for the block only, on a free loopback port."""
    from prefect.server.api.server import SubprocessASGIServer

    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        server = SubprocessASGIServer()
        server.start()
        try:
            with reporting_to(server.api_url):
                yield server.api_url
        finally:
            server.stop()


@contextlib.contextmanager
def reporting_to(api_url: str) -> Iterator[None]:
    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            yield
        finally:  # also after a failure or Ctrl-C: their logs matter most
            drain_reporting()


def drain_reporting() -> None:
    """Send the logs and events still queued to the server (as prefect_test_harness does before stopping it),
    while this process still points at it: a temporary server is stopped next, and a log line sent after that
    would be retried for a long time before the process can exit."""
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
    with prefect_api(config.workdir):
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
