"""The training task: one stage of the paper's recipe, run as a Ray Train job by `tasks.ray_train.run_stage`.

It runs in the flow's process, not as a Ray task: run_stage itself places its workers on the Ray cluster (a task
holding a CPU while its own workers wait for CPUs could deadlock a small cluster).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.artifacts import ArtifactStore
from tasks.components import Components
from tasks.ray_train import StageRunConfig, run_stage


@task(name="train-stage", cache_policy=NO_CACHE)
def train_stage(
    config: StageRunConfig,
    root: str,
    features_id: str,
    out_id: str,
    components: Components,
    init_model: str | None = None,
    ray_address: str | None = None,
) -> dict:
    """Train (or resume) the stage into artifact `out_id` on feature artifact `features_id`; returns its outputs.

    init_model: the previous stage's final.pt. The stage's sample grids use the pipeline's T5 and codec.
    """
    store = ArtifactStore(root)
    return run_stage(
        config,
        store.get(features_id),
        store.get(out_id),
        init_model=init_model,
        text_encoder=components.t5,
        codec=components.codec,
        ray_address=ray_address,
    )
