"""The README's demo: `neuron-assets run` with the default config, then `neuron-assets sql`.

Its own tier (`slow`): it is the whole demo on SmolLM2-135M-Instruct, a few minutes on 2
cores. CI runs it with the rest (`pytest` runs every tier).
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path

import pytest

from neuron_assets.cli import main
from neuron_assets.config import Config

pytestmark = pytest.mark.slow

# Per feature (layer, polarity, neuron): the spread of its top exemplars' activations (after
# the chat-header prefix) and of their per-sequence extremes; extreme is in the polarity's
# orientation, so a real negative polarity has extremes well above 0.
SPREAD_BY_FEATURE = """
select layer, polarity, neuron, min(extreme) as weakest, max(extreme) - min(extreme) as extreme_spread,
       stddev_pop(a) as activation_sd
from (select e.layer, e.polarity, e.neuron, e.extreme, unnest(e.activations[s.prefix_len + 1:]) as a
      from exemplars e join sequences s using (seq_id) where e.sample = 'top' and e.kind = 'neuron')
group by all order by all
"""


def test_default_demo_runs_end_to_end_and_both_polarities_are_real(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NEURON_ASSETS_CONFIG", raising=False)
    monkeypatch.setenv("NEURON_ASSETS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "catalog.duckdb" in out

    assert main(["sql", SPREAD_BY_FEATURE, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    config = Config()
    by_partition = defaultdict(list)
    for row in rows:
        by_partition[(row["layer"], row["polarity"])].append(row)
    expected = {(layer, polarity) for layer in config.features.layers for polarity in config.features.polarities}
    assert set(by_partition) == expected, "every layer x polarity partition has exemplars"
    for partition, features in by_partition.items():
        assert len(features) == config.features.neurons.sample, partition
        assert all(f["activation_sd"] > 0 and f["extreme_spread"] > 0 for f in features), \
            f"{partition}: every feature's activations vary"
        assert all(f["weakest"] > 0 for f in features), f"{partition}: top exemplars activate in the polarity's direction"
    for layer in config.features.layers:  # a gated MLP's negative side is as real as its positive (MiniLM's was flat)
        neg, pos = (sorted(f["weakest"] for f in by_partition[(layer, p)]) for p in ("neg", "pos"))
        assert neg[len(neg) // 2] > pos[len(pos) // 2] / 3, f"layer {layer}: negative extremes {neg} against positive {pos}"

    assert main(["sql", "select kind, count(*) as n, count(distinct layer) as layers, count(distinct polarity) as "
                 "polarities, count(description) as described from neuron_descriptions group by kind order by kind",
                 "--format", "json"]) == 0
    neurons, latents = json.loads(capsys.readouterr().out)
    assert neurons["kind"] == "neuron" and neurons["n"] == len(expected) * config.features.neurons.sample
    assert neurons["layers"] == len(config.features.layers)
    # the demo's SAE: a sample of its latents described beside its layer's neurons (pos only)
    assert latents["kind"] == "sae" and (latents["layers"], latents["polarities"]) == (len(config.sae.layers), 1)
    assert latents["n"] == config.sae.latents.sample * len(config.sae.layers) and latents["described"] > 0

    work = tmp_path / "examples"  # every example of the README and docs/ on this store
    work.mkdir()
    monkeypatch.chdir(work)
    check_documented_examples(work, capsys)


def documented_examples() -> list[tuple[str, list[str]]]:
    """Every `neuron-assets ...` line of a code block in the README and docs/, as (where,
    arguments); those that need another config, a browser, a server or a whole run are left out."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        inside = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                inside = not inside
            elif inside and line.strip().startswith("neuron-assets "):
                command = line.strip().split(" > ")[0]  # a shell redirection: the output is checked here
                if any(word in command for word in ("--config", "neuron-assets run", "neuron-assets ui",
                                                    "neuron-assets serve")):
                    continue
                args = shlex.split(command, comments=True)[1:]
                args = ["report"] if args[0] == "report" else args  # --open would start a browser
                args = [f"@{root / a[1:]}" if a.startswith("@") else a for a in args]
                found.append((f"{page.name}: {command}", args))
    return found


def check_documented_examples(work: Path, capsys) -> None:
    """Each example runs on the demo's store and shows something: output, or the file it writes."""
    examples = documented_examples()
    assert len(examples) >= 15
    for where, args in examples:
        before = set(work.rglob("*"))
        assert main(args) == 0, where
        shown = capsys.readouterr().out.strip()
        if args[0] == "search" and "--format" in args:
            assert json.loads(shown), f"{where}: no result on the demo"
        assert shown or set(work.rglob("*")) - before, f"{where}: printed nothing and wrote nothing"
        assert "no description matches" not in shown, where
