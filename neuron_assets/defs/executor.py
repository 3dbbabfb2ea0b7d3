"""Which Dagster executor runs the steps: chosen by $NEURON_ASSETS_EXECUTOR, a deployment's
choice rather than a config's (the same config runs on a laptop and on a cluster).

- unset or ``multiprocess``: Dagster's default, a process per step on this machine;
- ``in_process``: every step in the run's own process;
- ``k8s``: dagster-k8s's ``k8s_job_executor``, a Kubernetes Job per step. Every GPU step
  (an asset in the ``gpu`` pool) asks for ``nvidia.com/gpu``: $NEURON_ASSETS_GPUS_PER_STEP
  (default 1) each, and the vLLM explainer as many as its ``tensor_parallel_size``. The
  rest of the executor's config (namespace, image pull, env, per-step overrides) comes
  from the run config as usual; an override given there wins. See docs/deploy_k8s.md.
- ``celery``: dagster-celery's ``celery_executor``, a Celery task per step on whichever worker
  takes it from its queue: ``gpu`` for the steps of the ``gpu`` pool (the pool the k8s
  executor gives ``nvidia.com/gpu``), ``cpu`` for the rest (the ``dagster-celery/queue`` tag
  :func:`step_queue` sets on every asset). Broker and result backend: $NEURON_ASSETS_CELERY_BROKER
  (default ``redis://localhost:6379/0``). A step's message is acknowledged only when the step
  has ended, so the step of a worker that dies is delivered again, to another worker, once the
  broker's visibility timeout ($NEURON_ASSETS_CELERY_VISIBILITY_S, default 3600 s) has passed.
  Workers: ``celery -A neuron_assets.defs.celery_worker worker -Q gpu,cpu``. See
  docs/deploy_celery.md.
"""

from __future__ import annotations

import os

import dagster as dg

from neuron_assets.config import Config, ConfigError

EXECUTOR_ENV = "NEURON_ASSETS_EXECUTOR"
GPUS_ENV = "NEURON_ASSETS_GPUS_PER_STEP"
EXPLAIN_OP = "candidate_descriptions"
BROKER_ENV = "NEURON_ASSETS_CELERY_BROKER"
VISIBILITY_ENV = "NEURON_ASSETS_CELERY_VISIBILITY_S"
DEFAULT_BROKER = "redis://localhost:6379/0"
QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
GPU_QUEUE, CPU_QUEUE = "gpu", "cpu"
DISTRIBUTED = ("k8s", "celery")  # steps run in processes that load the code location themselves


def executor_name() -> str:
    """The executor $NEURON_ASSETS_EXECUTOR names ('' for Dagster's default)."""
    name = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    return "" if name in ("multiprocess", "default") else name


def step_queue(pool: str | None) -> str:
    """The Celery queue of a step: ``gpu`` for the ``gpu`` pool, ``cpu`` for the rest."""
    return GPU_QUEUE if pool == "gpu" else CPU_QUEUE


def select_executor(config: Config, assets) -> dg.ExecutorDefinition | None:
    """The executor $NEURON_ASSETS_EXECUTOR names; None for Dagster's default."""
    name = executor_name()
    if name == "":
        return None
    if name == "in_process":
        return dg.in_process_executor
    if name == "celery":
        return celery_executor()
    if name != "k8s":
        raise ConfigError(f"{EXECUTOR_ENV}={name!r} is not an executor; use k8s, celery, multiprocess or in_process "
                          "(or unset it)")
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


def celery_settings() -> dict:
    """The celery executor's defaults, which its workers must share (neuron_assets.defs.celery_worker
    builds their app from the same): broker and backend, late acknowledgement (a step whose
    worker died is delivered again), one step at a time per worker process, ``cpu`` as the queue
    of an untagged step."""
    broker = os.environ.get(BROKER_ENV, "").strip() or DEFAULT_BROKER
    try:
        visibility = float(os.environ.get(VISIBILITY_ENV, "3600"))
    except ValueError:
        raise ConfigError(f"{VISIBILITY_ENV} must be a number of seconds, not {os.environ[VISIBILITY_ENV]!r}") from None
    return {
        "broker": broker,
        "backend": broker,
        "config_source": {
            "task_acks_late": True,  # acknowledged when the step ends: a dead worker's step is delivered again
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "task_default_queue": CPU_QUEUE,
            "broker_connection_retry_on_startup": True,
            # unacknowledged messages go back to their queue after this long without an ack; swept every second
            "broker_transport_options": {"visibility_timeout": visibility, "unacked_restore_interval": 1,
                                         "unacked_restore_throttle": 1, "max_retries": 3, "interval_start": 0,
                                         "interval_step": 0.2, "interval_max": 0.5},
            "result_backend_transport_options": {"visibility_timeout": visibility},
        },
    }


def celery_executor() -> dg.ExecutorDefinition:
    try:
        from dagster_celery import celery_executor as executor
        from dagster_celery.executor import CELERY_CONFIG
    except ImportError:
        raise ConfigError(f"{EXECUTOR_ENV}=celery needs dagster-celery: pip install 'neuron-assets[celery]' "
                          "(dagster-celery==0.29.27, the release that matches dagster 1.13.27, and redis)") from None
    defaults = celery_settings()

    def with_defaults(user_config: dict) -> dict:
        merged = {**defaults, **{k: v for k, v in user_config.items() if v is not None}}
        merged["config_source"] = {**defaults["config_source"], **(user_config.get("config_source") or {})}
        return merged

    # dagster-celery's schema, but without its default backend (rpc://), so that ours applies unless one is given
    schema = {**CELERY_CONFIG, "backend": dg.Field(dg.Noneable(dg.StringSource), is_required=False,
                                                   description=f"The Celery result backend; default: ${BROKER_ENV}")}
    return executor.configured(with_defaults, name="celery", config_schema=schema)
