"""The definitions under the k8s executor (issue 9, part 7): they load, every GPU step asks
for nvidia.com/gpu, the explainer for its tensor-parallel GPUs, and the run config's own
settings still apply."""

from __future__ import annotations

import dagster as dg
import pytest

from neuron_assets.config import ConfigError
from neuron_assets.defs.definitions import build_definitions


def _gpu_limit(step_config: dict) -> int:
    return step_config["container_config"]["resources"]["limits"]["nvidia.com/gpu"]


def test_definitions_load_with_the_k8s_executor(tiny_config, monkeypatch):
    monkeypatch.setenv("NEURON_ASSETS_EXECUTOR", "k8s")
    monkeypatch.setenv("NEURON_ASSETS_GPUS_PER_STEP", "2")
    path = tiny_config(explain__backend="vllm", explain__model="/models/explainer",
                       explain__engine_kwargs={"tensor_parallel_size": 4})
    defs = build_definitions(str(path))
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    run_config = {"execution": {"config": {"job_namespace": "neurons",
                                           "per_step_k8s_config": {"neuron_report": {"container_config": {"resources": {}}}}}}}
    resolved = dg.validate_run_config(job, run_config)["execution"]["k8s"]
    steps = resolved["per_step_k8s_config"]
    assert resolved["job_namespace"] == "neurons" and "neuron_report" in steps, "the run config's settings stay"
    assert _gpu_limit(steps["exemplars"]) == 2 and _gpu_limit(steps["simulator_checkpoint"]) == 2
    assert _gpu_limit(steps["candidate_descriptions"]) == 4, "the vLLM explainer gets tensor_parallel_size GPUs"
    assert "corpus" not in steps and "description_scores" not in steps, "CPU steps ask for no GPU"


def test_an_unknown_executor_is_named(tiny_config, monkeypatch):
    monkeypatch.setenv("NEURON_ASSETS_EXECUTOR", "celery-ish")
    with pytest.raises(ConfigError, match="NEURON_ASSETS_EXECUTOR='celery-ish' is not an executor; use k8s"):
        build_definitions(str(tiny_config()))
