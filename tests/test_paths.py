"""Paths survive any worker: every local path a user gives is made absolute where the config loads, so Ray tasks,
Ray Train workers and Prefect workers (which run in other directories) find what the command meant."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from storage.artifacts import ArtifactStore
from storage.loader import read_shards
from storage.shards import ShardMissing, write_shard
from tasks.config import load_config

HUB_T5 = "google/t5-v1_1-xxl"


def test_local_paths_become_absolute_where_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_t5").mkdir()
    config = load_config(
        "demo",
        [
            "ingest.source={kind: sa1b, path: data/sa1b, captions: ~/captions}",
            "components.t5=my_t5",
            "components.vae=./not_yet/vae",
            f"components.llava={HUB_T5}",
            "stage1.model.init=ckpt/dit.pt",
            "evaluate.metrics={fid_weights: w/inception.pth, clip_model: openai/clip-vit-large-patch14}",
        ],
        workdir="work",
    )
    assert config.workdir == str(tmp_path / "work")
    assert config.ingest.source.path == str(tmp_path / "data/sa1b")
    assert config.ingest.source.captions == str(Path.home() / "captions")
    assert config.components.t5 == str(tmp_path / "my_t5")  # exists: a directory, as from_pretrained reads it
    assert config.components.vae == str(tmp_path / "not_yet/vae")  # written as a path: stays one
    assert config.components.llava == HUB_T5  # a hub id stays a hub id
    assert config.stage1.model.init == "ckpt/dit.pt"  # shaped like a hub id and absent: DiT loads it from the hub
    assert config.evaluate.metrics.fid_weights == str(tmp_path / "w/inception.pth")
    assert config.evaluate.metrics.clip_model == "openai/clip-vit-large-patch14"
    assert load_config(config.model_dump(mode="json")) == config  # idempotent: a config handed on stays the same

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/dit.pt").touch()
    assert load_config("demo", ["stage1.model.init=ckpt/dit.pt"]).stage1.model.init == str(tmp_path / "ckpt/dit.pt")
    assert load_config("demo", workdir="s3://bucket/prefix").workdir == "s3://bucket/prefix"
    assert load_config("demo").workdir == str(tmp_path / "workdir")  # the default, relative to the command's directory


def test_the_artifact_store_root_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ArtifactStore("rel/store").root == str(tmp_path / "rel/store")
    assert ArtifactStore("memory://store").root == "memory://store"


def test_a_missing_shard_is_told_apart_from_a_damaged_one(tmp_path, monkeypatch):
    info = write_shard(str(tmp_path / "000000.tar"), [{"__key__": "a", "txt": "x"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ShardMissing) as missing:
        list(read_shards([("000000.tar", info)]))
    message = str(missing.value)
    assert f"looked up {elsewhere}/000000.tar from the current directory {elsewhere}" in message
    assert "damaged" not in message and "cannot see it" in message


@pytest.mark.slow
def test_the_cli_trains_with_a_relative_workdir_from_another_directory(tmp_path, flows_env):
    """The README's path: a relative --workdir and -c, started from a directory that is not the repository; the
    run starts its own Ray instance, whose Ray Train workers run in directories of their own."""
    cwd = tmp_path / "user"
    cwd.mkdir()
    preset = {
        "base": "demo",
        "until": "stage1",
        "ingest": {"source": {"count": 64, "image_size": 32}, "samples_per_shard": 16},
        "caption": {"use": "sidecar", "generation": {"max_new_tokens": 4}},
        "stage1": {"train": {"steps": 2}},
        "stage3": {"model": {"input_size": 8}},
        "ray": {"num_cpus": 2},
    }
    (cwd / "small.yaml").write_text(yaml.safe_dump(preset))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's server: no second one to start
    pixart = str(Path(sys.executable).parent / "pixart")
    command = [pixart, "run", "train", "--stage", "1", "-c", "small.yaml", "--workdir", "rel/work"]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (stage1,) = (cwd / "rel/work").glob("stage1-*")
    assert (stage1 / "manifest.json").is_file() and (stage1 / "final.pt").is_file()
