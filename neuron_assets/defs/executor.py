"""Which Dagster executor runs the steps: chosen by $NEURON_ASSETS_EXECUTOR, a deployment's
choice rather than a config's (the same config runs on a laptop and on a cluster).

- unset or ``multiprocess``: Dagster's default, a process per step on this machine;
- ``in_process``: every step in the run's own process;
- ``k8s``: dagster-k8s's ``k8s_job_executor``, a Kubernetes Job per step. Every GPU step
  (an asset in the ``gpu`` pool) asks for ``nvidia.com/gpu``: $NEURON_ASSETS_GPUS_PER_STEP
  (default 1) each, and the vLLM explainer as many as its ``tensor_parallel_size``. The
  rest of the executor's config (namespace, image pull, env, per-step overrides) comes
  from the run config as usual; an override given there wins. See docs/deploy_k8s.md.
"""

from __future__ import annotations

import os

import dagster as dg

from neuron_assets.config import Config, ConfigError

EXECUTOR_ENV = "NEURON_ASSETS_EXECUTOR"
GPUS_ENV = "NEURON_ASSETS_GPUS_PER_STEP"
EXPLAIN_OP = "candidate_descriptions"


def select_executor(config: Config, assets) -> dg.ExecutorDefinition | None:
    """The executor $NEURON_ASSETS_EXECUTOR names; None for Dagster's default."""
    name = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    if name in ("", "multiprocess", "default"):
        return None
    if name == "in_process":
        return dg.in_process_executor
    if name != "k8s":
        raise ConfigError(f"{EXECUTOR_ENV}={name!r} is not an executor; use k8s, multiprocess or in_process (or unset it)")
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ConfigError(f"{EXECUTOR_ENV}=k8s needs dagster-k8s: pip install dagster-k8s==0.29.27 "
                          "(the release that matches dagster 1.13.27)") from None
    gpu_steps = gpu_step_config(config, assets)

    def with_gpus(user_config: dict) -> dict:
        return {**user_config, "per_step_k8s_config": {**gpu_steps, **user_config.get("per_step_k8s_config", {})}}

    return k8s_job_executor.configured(with_gpus, name="k8s", config_schema=k8s_job_executor.config_schema.config_type)


def gpu_step_config(config: Config, assets) -> dict[str, dict]:
    """dagster-k8s container resources per GPU op: ``nvidia.com/gpu`` as a limit (Kubernetes
    schedules extended resources by their limit)."""
    try:
        per_step = int(os.environ.get(GPUS_ENV, "1"))
    except ValueError:
        raise ConfigError(f"{GPUS_ENV} must be a whole number of GPUs, not {os.environ[GPUS_ENV]!r}") from None
    steps = {}
    for asset in assets:
        if not isinstance(asset, dg.AssetsDefinition) or getattr(asset.node_def, "pool", None) != "gpu":
            continue
        gpus = per_step
        if asset.node_def.name == EXPLAIN_OP:  # vLLM shards a large explainer over tensor_parallel_size GPUs
            gpus = int(config.explain.engine_kwargs.get("tensor_parallel_size", per_step))
        steps[asset.node_def.name] = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": gpus}}}}
    return steps
