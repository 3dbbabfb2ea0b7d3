"""`neuron-assets plan`: predictions from the config and the model's shape, held against a
measured run of the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from neuron_assets.cli import main
from neuron_assets.config import REPO_ROOT, load_config
from neuron_assets.features.sae_stage import make_saes
from neuron_assets.stages import make_corpus, make_exemplars
from neuron_assets.store import Store
from neuron_assets.plan import ModelShape, find_model_shape, plan_run
from neuron_assets.types import Polarity

LLAMA_CONFIG = REPO_ROOT / "configs" / "llama31_8b_instruct.yaml"


def test_plan_matches_a_measured_tiny_run(tiny_config, tiny_llama):
    # an SAE on layer 1 (2x, 192 latents) whose 12 sampled latents are described beside the neurons
    config = load_config(tiny_config(sae={"layers": [1], "latents": {"sample": 12}, "expansion": 2, "k": 4,
                                          "steps": 20, "batch_tokens": 32, "block_sequences": 24, "eval_sequences": 2}))
    make_corpus(config, "run-plan")
    [sae] = make_saes(config, log=lambda text: None)
    sae_disk = sum(path.stat().st_size for path in sae.folder.iterdir())
    measured: dict = {}
    partitions = [(layer, polarity) for layer in range(3) for polarity in Polarity]
    run = make_exemplars(config, partitions, "run-plan", progress=False, log=lambda text: None, measured=measured)
    disk = sum(w.path.stat().st_size for w in run.written)
    assert Store(config.root).read("neuron_stats", 1, "pos")["kind"].to_list().count("sae") == 12

    plan = plan_run(config, ModelShape.from_config_json(tiny_llama), device="cpu")
    assert plan.features == 18 + 12 and plan.latents == 12 and plan.sequences == 72
    exemplars = next(s for s in plan.stages if s.stage == "exemplars")
    predicted_state = plan.exemplar_pass["state_bytes"]
    assert abs(predicted_state - measured["peak_state_bytes"]) <= 0.2 * measured["peak_state_bytes"], (predicted_state, measured)
    assert abs(exemplars.disk_bytes - disk) <= 0.2 * disk, (exemplars.disk_bytes, disk)
    # The host peak counts the tables built at the end of the pass (three layers at once): the
    # plan bounds each layer's as measured, and meets a layer of neurons within 20% (the sparse
    # latents of layer 1 fill fewer quantile and quiet rows).
    axis = run.plan.groups[0].neurons
    for layer, measured_tables in measured["layer_table_bytes"].items():
        predicted_tables = len(axis[layer]) * plan.exemplar_pass["table_bytes"]
        assert measured_tables <= predicted_tables, (layer, predicted_tables, measured_tables)
        if layer != 1:
            assert predicted_tables - measured_tables <= 0.2 * measured_tables, (layer, predicted_tables, measured_tables)
    tables = sum(len(v) for v in axis.values()) * plan.exemplar_pass["table_bytes"]  # 3 layers: all in flight
    assert plan.exemplar_pass["peak_host_bytes"] == predicted_state + tables
    assert run.plan.passes == measured["passes"] == 1
    training = next(s for s in plan.stages if s.stage == "sae_checkpoint")
    assert abs(training.disk_bytes - sae_disk) <= 0.2 * sae_disk, (training.disk_bytes, sae_disk)
    assert "192 latents" in training.note and training.device_hours > 0
    # latents are described in the pos polarity only: 18 neurons x 2 + 12 latents
    candidates = next(s for s in plan.stages if s.stage == "explain")
    assert candidates.disk_bytes == (18 * 2 + 12) * config.explain.k * 200


def test_llama_plan_fits_one_80gb_gpu_and_exemplars_in_3_h100_hours(capsys):
    config = load_config(LLAMA_CONFIG)
    shape, source = find_model_shape(config, LLAMA_CONFIG)
    assert source.endswith("llama31_8b_instruct.shape.json")
    assert (shape.hidden, shape.intermediate, shape.layers, shape.kv_heads) == (4096, 14336, 32, 8)
    assert 8.0e9 < shape.params < 8.1e9  # Llama-3.1-8B has 8.03B parameters

    assert main(["--config", str(LLAMA_CONFIG), "plan", "--device", "h100", "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["features"] == 458_752 and planned["fits_one_device"]
    for stage in planned["stages"]:
        assert stage["peak_device_bytes"] <= 80e9, stage
    exemplars = next(s for s in planned["stages"] if s["stage"] == "exemplars")
    assert exemplars["device_hours"] <= 3.0
    assert planned["reference"]["cost per neuron"][1] == "$0.046"

    assert main(["--config", str(LLAMA_CONFIG), "plan", "--device", "h100"]) == 0
    table = capsys.readouterr().out
    assert "Transluce" in table and "exemplars" in table


def test_config_may_follow_the_command(capsys):
    assert main(["--config", str(LLAMA_CONFIG), "plan", "--format", "json"]) == 0
    before = capsys.readouterr().out
    assert main(["plan", "--config", str(LLAMA_CONFIG), "--format", "json"]) == 0
    assert capsys.readouterr().out == before and json.loads(before)["features"] == 458_752
    assert main(["--config", "elsewhere.yaml", "sql", "--config", str(LLAMA_CONFIG), "select 1"]) == 1  # the later one wins
    err = capsys.readouterr().err
    assert "elsewhere.yaml" not in err and "no data under" in err


def test_the_released_simulator_preset_plans_scoring_but_no_training(capsys):
    preset = LLAMA_CONFIG.with_name("transluce_llama31_8b.yaml")
    assert main(["--config", str(preset), "plan", "--format", "json"]) == 0
    stages = [s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert "simulation (scoring)" in stages and not any(s.startswith("simulator training") for s in stages)


def test_the_llama_preset_trains_its_simulator_at_the_methods_scale(capsys):
    """Transluce: stage 1 on about 4,200 exemplar sets of 25 sequences (~1,500 steps at batch
    64), stage 2 on 2,000 fresh neurons; the plan shows pairs and steps of each stage."""
    assert main(["--config", str(LLAMA_CONFIG), "plan", "--format", "json"]) == 0
    stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    one, two = stages["simulator training stage 1"], stages["simulator training stage 2"]
    assert "105,000 pairs" in one["note"] and "1,641 steps at batch 64" in one["note"]
    assert "50,000 pairs" in two["note"] and "782 steps" in two["note"]
    assert "below the" not in one["note"], "enough pairs for an 8B backbone to select"
    assert 0.1 < one["device_hours"] < 10 and 0 < two["device_hours"] < one["device_hours"]


def test_plan_without_a_shape_says_how_to_give_one(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("subject: {model: some-org/not-cached-model}\n")
    assert main(["--config", str(path), "plan"]) == 1
    assert "--shape" in capsys.readouterr().err


def test_plan_bounds_the_checkpoints_of_a_measured_run(tiny_config, tiny_llama):
    shape = ModelShape.from_config_json(tiny_llama)

    def config_with(**more):  # every neuron of the three layers, a progress save every 2 batches
        return load_config(tiny_config(features={"layers": "all", "neurons": "all"}, exemplars__checkpoint_every=2, **more))

    whole = plan_run(config_with(), shape, device="cpu").exemplar_pass
    layer_budget = whole["fixed_bytes"] + 100 * whole["per_feature_bytes"]  # one layer of 96 neurons, not two
    config = config_with(exemplars__device_memory_gb=layer_budget / 1e9)
    make_corpus(config, "run-ckpt")
    measured: dict = {}
    partitions = [(layer, polarity) for layer in range(3) for polarity in Polarity]
    run = make_exemplars(config, partitions, "run-ckpt", progress=False, log=lambda text: None, measured=measured)
    planned = plan_run(config, shape, device="cpu").exemplar_pass
    assert run.plan.passes == measured["passes"] == planned["passes"] == 3
    assert not any(Store(config.root).checkpoint_dir.iterdir()), "the checkpoint is gone once the pass is done"
    for predicted, seen in ((planned["checkpoint_peak_bytes"], measured["peak_checkpoint_bytes"]),
                            (planned["checkpoint_written_bytes"], measured["checkpoint_written_bytes"])):
        assert abs(predicted - seen) <= 0.2 * seen, (predicted, seen)


def test_the_gpu_check_runs_its_whole_path_on_cpu_with_a_tiny_llama(tmp_path):
    # bench/gpu_check.py is what a session lent a GPU runs once, in minutes: its code must not
    # wait for that session to be found broken. --tiny is the same code on a 4-layer Llama.
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert "512 x 2 polarities in 1 pass(es)" == rows["features collected"]
    assert "adapters moved: True" in rows["LoRA step (s, peak GB)"] and "weights moved: True" in rows["full step (s, peak GB)"]
    measured, planned = (float(x) for x in re.findall(r"([\d.]+) (?:measured|planned)", rows["a layer's tables on the host (GB)"]))
    assert 0 < measured <= planned
    assert float(rows["simulator pairs/s"].split()[0].replace(",", "")) > 0


def test_a_cpu_simulator_training_is_planned_with_its_hours(tmp_path, capsys):
    """The demo's opt-in fine-tuned simulator (a 2-layer MiniLM backbone) trained on CPU: its two
    stages are planned with their pairs, steps and hours (they were left out, 0.00 h in all)."""
    config = tmp_path / "ft.yaml"
    config.write_text("simulate:\n  compare_with: [lexical, finetuned]\n")
    assert main(["--config", str(config), "plan", "--device", "cpu", "--format", "json"]) == 0
    stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    one = stages["simulator training stage 1"]
    assert one["device_hours"] > 0 and "192 pairs" in one["note"] and "below the 1,000 pairs" in one["note"]
