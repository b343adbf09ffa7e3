"""Shared fixtures. Nothing in the tests may reach a model hub: HF_HUB_OFFLINE is set before any import."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from models.text_encoder import T5TextEncoder  # noqa: E402
from models.tiny import build_tiny_components  # noqa: E402
from models.vae import VAE  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Toy-sized ops gain nothing from threads, and on a busy CPU OpenMP's spinning threads can make a
    millisecond VAE pass take a second. Subprocesses and Ray workers choose their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny T5 (+ tokenizer), VAE and LLaVA, saved with save_pretrained; loaded back by production code."""
    return build_tiny_components(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def t5(tiny):
    return T5TextEncoder.from_pretrained(tiny.t5_dir)


@pytest.fixture(scope="session")
def vae(tiny):
    return VAE.from_pretrained(tiny.vae_dir)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one costs ~5 s); yields its address.

    4 logical CPUs on the 2 cores: a Ray Train run's placement group can outlive it for a while (its cleaner
    reports the controller gone), and the next 2-worker run must not wait for those CPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (a real one, on loopback) for the session; PREFECT_API_URL points at it."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


@pytest.fixture(scope="session")
def flows_env(prefect_server, ray_local):
    """A Prefect server and a Ray instance, both up."""
    return ray_local
