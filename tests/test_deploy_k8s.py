"""The definitions under the k8s executor (issue 9, part 7): they load, every GPU step asks
for nvidia.com/gpu, the explainer for its tensor-parallel GPUs, and the run config's own
settings still apply."""

from __future__ import annotations

import json

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


# -- the Job specs the executor would submit, validated offline (issue 30, part 3) ----------------

STORE_CLAIM = "neuron-store"


def _deployment_run_config() -> dict:
    """The executor settings of docs/deploy_k8s.md: namespace, secrets, env and the store's volume."""
    return {"execution": {"config": {
        "job_namespace": "neurons",
        "env_secrets": ["openai-key"],
        "env_vars": ["NEURON_ASSETS_CONFIG=/config/run.yaml", "NEURON_ASSETS_LOCK_LEASE_S=120"],
        "volumes": [{"name": "store", "persistent_volume_claim": {"claim_name": STORE_CLAIM}},
                    {"name": "config", "config_map": {"name": "neuron-assets-config"}}],
        "volume_mounts": [{"name": "store", "mount_path": "/store"},
                          {"name": "config", "mount_path": "/config", "read_only": True}],
    }}}


def test_the_job_specs_of_a_gpu_step_and_a_cpu_step_validate_against_the_kubernetes_schema(tiny_config, monkeypatch):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    from neuron_assets.defs.k8s_specs import step_job_manifest

    monkeypatch.setenv("NEURON_ASSETS_EXECUTOR", "k8s")
    monkeypatch.setenv("NEURON_ASSETS_GPUS_PER_STEP", "1")
    defs = build_definitions(str(tiny_config(storage={"root": "/store/tiny"})))
    image = "registry.example/neuron-assets:0.1.0"
    version = latest_version()  # the newest schema the package ships: nothing is fetched
    specs = {op: step_job_manifest(defs, _deployment_run_config(), op, image)
             for op in ("exemplars", "candidate_descriptions")}
    for op, spec in specs.items():
        kubernetes_validate.validate(spec, version, strict=True)  # raises on any field the schema does not have
        pod = spec["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert spec["kind"] == "Job" and spec["metadata"]["labels"]["dagster/op"] == op
        assert container["image"] == image and container["args"][:3] == ["dagster", "api", "execute_step"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NEURON_ASSETS_CONFIG"] == "/config/run.yaml" and env["DAGSTER_RUN_STEP_KEY"] == op
        assert "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS" in env, "the step's arguments, as dagster-k8s sends them"
        assert {"secret_ref": {"name": "openai-key"}} in [{"secret_ref": {"name": s["secretRef"]["name"]}}
                                                          for s in container.get("envFrom", [])]
        assert {"name": "store", "mountPath": "/store"} in container["volumeMounts"]
        assert {"name": "store", "persistentVolumeClaim": {"claimName": STORE_CLAIM}} in pod["volumes"]
    gpu = specs["exemplars"]["spec"]["template"]["spec"]["containers"][0]
    cpu = specs["candidate_descriptions"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"] == {"nvidia.com/gpu": "1"}, "the GPU step asks for its GPU (a quantity)"
    assert "nvidia.com/gpu" not in (cpu.get("resources") or {}).get("limits", {}), "the CPU step asks for none"

    broken = json.loads(json.dumps(specs["exemplars"]))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):  # the schema check does bite
        kubernetes_validate.validate(broken, version, strict=True)
