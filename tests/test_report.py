"""Neuron pages and the HTML report, on one finished tiny run (conftest's `described_run`: lexical
simulator, correlation);
the score table's layout for several scorers and simulators on rows of that shape."""

from __future__ import annotations

import html
import re
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.report.neuron import load_neuron
from neuron_assets.store import Store
from neuron_assets.types import Sample, Split


def _store(config_path: Path) -> Store:
    return Store(load_config(config_path).root)


def _a_described_neuron(store: Store, layer: int = 1, polarity: str = "neg") -> dict:
    return store.read("neuron_descriptions", layer, polarity).sort("neuron").row(0, named=True)


def test_show_prints_every_scorers_val_and_test_and_the_control(described_run, capsys, monkeypatch):
    store = _store(described_run)
    row = _a_described_neuron(store)
    scores = store.read("description_scores", 1, "neg").filter(pl.col("neuron") == row["neuron"])
    # show reads only this neuron's rows: no whole-table read
    monkeypatch.setattr(Store, "read", lambda *a, **k: pytest.fail("show read a whole table"))
    monkeypatch.setattr(pl, "read_parquet", lambda *a, **k: pytest.fail("show read a whole file"))
    assert main(["--config", str(described_run), "show", "1", str(row["neuron"]), "--polarity", "neg", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"description: {row['description']}" in out
    for scorer, simulator, split in scores.select("scorer", "simulator", "split").unique().iter_rows():
        label = scorer + (f" ({simulator})" if simulator else "")
        assert f"{label} {split}" in out
    control = scores.filter(pl.col("role") == "shuffled_control")
    assert control.height and f"control (neuron {row['control_source_neuron']})" in out
    table = out.split("scored val only):")[1].split("exemplars")[0]
    for score in control["score"]:
        assert f"{score:.3f}" in table
    assert f"test {row['test_score']:.3f}" in out and f"test {row['control_test_score']:.3f}" in out


def test_the_score_table_has_a_val_and_test_column_per_scorer_and_simulator():
    from neuron_assets.report.neuron import _candidates, score_table

    def row(candidate, scorer, simulator, split, score, role="candidate", source=3):
        return {"neuron": 3, "candidate": candidate, "role": role, "description": f"text {candidate}",
                "source_neuron": source, "scorer": scorer, "simulator": simulator, "split": split, "score": score}

    rows = [row(c, "correlation", sim, "val", 0.1 * c + d) for c in (0, 1) for sim, d in (("lexical", 0), ("semantic", 0.01))]
    rows += [row(c, "correlation", "semantic", "test", 0.2 + c) for c in (0, 1)]
    rows += [row(c, "embedding", None, "val", 0.5 + c) for c in (0, 1)]
    rows += [row(-1, scorer, sim, "val", -0.05, "shuffled_control", 8) for scorer, sim in
             (("correlation", "lexical"), ("correlation", "semantic"), ("embedding", None))]
    selected = {"candidate": 1, "scorer": "correlation", "simulator": "semantic"}
    candidates, control, scorers = _candidates(pl.DataFrame(rows), 3, selected, {2: (None, "HTTP 429")})
    assert scorers[0] == ("correlation", "semantic"), "the selecting scorer first"
    from neuron_assets.report.neuron import PolarityView

    view = PolarityView(None, {}, selected, candidates, control, scorers)
    header, table = score_table(view)
    assert header == ["", "candidate", "correlation (semantic) val", "correlation (semantic) test",
                      "correlation (lexical) val", "embedding val", "description"], "no column without a score"
    assert table[0][:5] == ["*", "#1", pytest.approx(0.11), pytest.approx(1.2), pytest.approx(0.1)]
    assert table[1][:2] == ["", "#0"] and table[2][1] == "#2" and table[2][-1] == "(failed: HTTP 429)"
    assert table[3][1] == "control (neuron 8)" and table[3][2:6] == [-0.05, None, -0.05, -0.05]


def test_show_html_writes_one_self_contained_page(described_run, tmp_path, capsys):
    store = _store(described_run)
    row = _a_described_neuron(store)
    page = tmp_path / "neuron.html"
    assert main(["--config", str(described_run), "show", "1", str(row["neuron"]), "--polarity", "neg", "-n", "3",
                 "--html", str(page)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["neuron.html"], "one file, no temporary left"
    text = page.read_text()
    assert html.escape(row["description"]) in text
    assert re.search(r"https?://", text) is None and "<link" not in text and "src=\"data:image/png;base64," in text
    view = load_neuron(store, 1, row["neuron"], "neg")
    assert list(view.polarities) == ["neg", "pos"], "both polarities, the asked one first"
    shown = [e for p in view.polarities.values()
             for e in p.feature.select(Split.TRAIN, Sample.TOP)[:3] + p.feature.select(Split.TRAIN, Sample.QUANTILE)]
    tokens = [t for e in shown for t in e.record.tokens]
    spans = re.findall(r'<span class="t( c)?"[^>]*>(.*?)</span>', text, flags=re.DOTALL)
    assert len(spans) == len(tokens), "one heat-map span per shown token"
    assert [body for _, body in spans] == [html.escape(t.replace("\n", "⏎\n")) for t in tokens]
    prefix = sum(e.record.prefix_len for e in shown)
    assert sum(1 for control, _ in spans if control) == prefix, "the prefix tokens are greyed"


def test_the_report_links_every_layer_page_and_existing_neuron_pages(described_run, capsys):
    store = _store(described_run)
    index = store.root / "report" / "index.html"
    assert index.is_file(), "the run built the report"
    with dg.DagsterInstance.from_config(str(store.root)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("neuron_report"))
        assert event.asset_materialization.metadata["index"].value == str(index)
    assert main(["--config", str(described_run), "report"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(index) and "built" not in err, "up to date: found, not rebuilt"
    pages = set(re.findall(r'href="(layer-[^"]+\.html)"', index.read_text()))
    assert pages == {f"layer-{layer}-{polarity}.html" for layer, polarity in store.partitions("neuron_stats")}
    linked = 0
    for name in pages:
        text = (index.parent / name).read_text()
        neurons = re.findall(r'href="(neurons/[^"]+\.html)"', text)
        assert neurons and all((index.parent / n).is_file() for n in neurons)
        linked += len(neurons)
        assert "<script>" in text and re.search(r"https?://", text) is None
    assert linked == 2 * 2 * 4, "every neuron of the demo-sized run has its page"
    assert not list(store.root.glob(".report*")), "no temporary folder left"


def test_a_bad_neuron_or_layer_names_what_was_collected(described_run, capsys):
    store = _store(described_run)
    collected = sorted(store.read("neuron_stats", 0, "pos")["neuron"].to_list())
    assert main(["--config", str(described_run), "show", "0", "9999"]) == 1
    err = capsys.readouterr().err
    assert "neuron 9999 of layer 0" in err and f"the {len(collected)} collected neurons" in err
    assert all(str(n) in err.split("are ")[1] for n in (collected[0], collected[-1]))
    assert main(["--config", str(described_run), "show", "7", str(collected[0])]) == 1
    err = capsys.readouterr().err
    assert "layer 7 was not collected" in err and "collected layers: 0-1" in err
