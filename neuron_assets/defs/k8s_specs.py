"""The Kubernetes Job a step would be submitted as under ``NEURON_ASSETS_EXECUTOR=k8s``, rendered
without a cluster, so that it can be read and validated offline (tests/test_deploy_k8s.py checks
it against the Kubernetes schema with kubernetes-validate).

:func:`step_job_manifest` goes through dagster-k8s's own steps of ``K8sStepHandler.launch_step``:
the executor's config (as the run config resolves it, with the GPU limits of
:func:`neuron_assets.defs.executor.gpu_step_config` merged in), the container context of the
executor, then the step's ``dagster-k8s/config`` tag, then ``per_step_k8s_config`` for its op;
the command and environment of ``ExecuteStepArgs`` for the step; and ``construct_dagster_k8s_job``.
What it cannot see without a cluster, it takes from :data:`CHART_LAUNCHER`: the run launcher's
settings as the Dagster Helm chart sets them (DAGSTER_HOME, the instance ConfigMap, the Postgres
secret). The run id is made up; the code location's image must be given.
"""

from __future__ import annotations

from types import SimpleNamespace

import dagster as dg

# The K8sRunLauncher settings a step's Job takes from the instance: the Helm chart's defaults.
CHART_LAUNCHER = SimpleNamespace(job_image=None, dagster_home="/opt/dagster/dagster_home",
                                 instance_config_map="dagster-instance",
                                 postgres_password_secret="dagster-postgresql-secret")


def step_job_manifest(defs: dg.Definitions, run_config: dict, op: str, image: str,
                      run_id: str = "0f0e0d0c-0b0a-4908-8706-050403020100", launcher=CHART_LAUNCHER) -> dict:
    """The Job (as the JSON the API server receives) that the k8s executor would create for the
    step of ``op`` in a run of the code location's asset job with ``run_config``."""
    from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_k8s_job_name,
        get_user_defined_k8s_config,
    )
    from kubernetes.client import ApiClient

    job = defs.resolve_implicit_global_asset_job_def()
    config = dg.validate_run_config(job, run_config)["execution"]
    if "k8s" not in config:
        raise ValueError("the definitions do not use the k8s executor: set NEURON_ASSETS_EXECUTOR=k8s")
    executor = config["k8s"]
    context = K8sContainerContext(
        image_pull_policy=executor.get("image_pull_policy"), image_pull_secrets=executor.get("image_pull_secrets"),
        service_account_name=executor.get("service_account_name"), env_config_maps=executor.get("env_config_maps"),
        env_secrets=executor.get("env_secrets"), env_vars=executor.get("env_vars"),
        volume_mounts=executor.get("volume_mounts"), volumes=executor.get("volumes"), labels=executor.get("labels"),
        namespace=executor.get("job_namespace"), resources=executor.get("resources"),
        scheduler_name=executor.get("scheduler_name"), security_context=executor.get("security_context"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor.get("step_k8s_config", {})),
    )
    node = job.graph.node_named(op)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(node.tags))).merge(
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            executor.get("per_step_k8s_config", {}).get(op, {}))))
    job_config = context.get_k8s_job_config(executor.get("job_image") or image, launcher)

    origin = ReconstructableRepository.for_module("neuron_assets.defs", "defs").get_reconstructable_job(
        IMPLICIT_ASSET_JOB_NAME).get_python_origin()
    step = ExecuteStepArgs(job_origin=origin, run_id=run_id, step_keys_to_execute=[op], should_verify_step=True)
    name = f"dagster-step-{get_k8s_job_name(run_id, op)}"
    v1_job = construct_dagster_k8s_job(
        job_config=job_config, args=step.get_command_args(skip_serialized_namedtuple=True), job_name=name,
        pod_name=name, component="step_worker", user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": job.name, "dagster/op": op, "dagster/run-id": run_id},
        env_vars=[*step.get_command_env(), {"name": "DAGSTER_RUN_JOB_NAME", "value": job.name},
                  {"name": "DAGSTER_RUN_STEP_KEY", "value": op}],
    )
    manifest = ApiClient().sanitize_for_serialization(v1_job)
    return {"apiVersion": "batch/v1", "kind": "Job", **manifest}
