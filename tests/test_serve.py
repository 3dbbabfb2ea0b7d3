"""The explorer's JSON API through a real HTTP client (httpx) against uvicorn serving it on a
described store: search (semantic, text, filters, pages), a feature with its highlighted
exemplars and every score, the overviews, steering, bad requests answered 4xx with a message,
and reads that keep answering while a writer replaces the store's files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pytest

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.store import Store
from tests.support.explorer import running_explorer, searchable_copy


@pytest.fixture(scope="module")
def explorer(described_run, tmp_path_factory):
    """(client, config path, app) of the explorer on a searchable copy of the described store."""
    path = searchable_copy(described_run, tmp_path_factory.mktemp("explorer"))
    with running_explorer(path) as (url, app), httpx.Client(base_url=url, timeout=60) as client:
        yield client, path, app


def described(path: Path) -> pl.DataFrame:
    config = load_config(str(path))
    store = Store(config.store_root)
    return pl.concat([store.read("neuron_descriptions", layer, polarity)
                      for layer, polarity in store.partitions("neuron_descriptions")], how="diagonal_relaxed")


def test_search_by_meaning_and_by_words_with_filters_and_pages(explorer):
    client, path, _ = explorer
    rows = described(path)
    wanted = rows.row(0, named=True)
    found = client.get("/api/search", params={"q": wanted["description"]}).json()
    assert found["method"] == "ivf" and found["hits"], found
    first = found["hits"][0]
    assert (first["layer"], first["polarity"], first["neuron"]) == (wanted["layer"], wanted["polarity"], wanted["neuron"])
    assert first["page"] == f"/features/{wanted['layer']}/{wanted['polarity']}/{wanted['neuron']}"

    words = client.get("/api/search", params={"q": "words", "mode": "text", "size": 5}).json()
    assert words["method"] == "bm25" and len(words["hits"]) == 5 and words["has_more"]
    second = client.get("/api/search", params={"q": "words", "mode": "text", "size": 5, "page": 2}).json()
    assert [h["rank"] for h in second["hits"]] == list(range(6, 6 + len(second["hits"])))
    assert not {(h["layer"], h["polarity"], h["neuron"]) for h in second["hits"]} & \
        {(h["layer"], h["polarity"], h["neuron"]) for h in words["hits"]}

    filtered = client.get("/api/search", params={"q": "words", "layer": 1, "polarity": "neg", "kind": "neuron",
                                                 "min_score": -1, "max_score": 0.5, "simulator": "lexical"}).json()
    assert filtered["method"] == "exact" and filtered["hits"]
    assert all(h["layer"] == 1 and h["polarity"] == "neg" and -1 <= h["score"] <= 0.5 for h in filtered["hits"])
    assert client.get("/api/search", params={"q": "words", "simulator": "nonesuch"}).json()["hits"] == []
    choices = client.get("/api/filters").json()
    assert choices["layers"] == [0, 1] and choices["simulators"] == ["lexical"] and choices["kinds"] == ["neuron"]


def test_a_feature_has_its_exemplars_highlighted_and_every_score(explorer):
    client, path, _ = explorer
    row = described(path).sort("test_score", descending=True).row(0, named=True)
    response = client.get(f"/api/features/{row['layer']}/{row['polarity']}/{row['neuron']}")
    assert response.status_code == 200, response.text
    feature = response.json()
    assert feature["description"]["description"] == row["description"]
    assert feature["feature"]["label"] == f"neuron L{row['layer']}/{row['neuron']} {row['polarity']}"
    assert len(feature["candidates"]) == 3 and sum(c["selected"] for c in feature["candidates"]) == 1
    assert feature["candidates"][0]["selected"] and feature["candidates"][0]["scores"]
    assert feature["control"]["number"] == -1 and feature["control"]["source_neuron"] is not None
    assert {"correlation"} == {s["scorer"] for s in feature["scorers"]}
    assert set(feature["exemplars"]) == {"train", "val", "test"}
    assert set(feature["exemplars"]["train"]) == {"top", "quantile", "random", "quiet"}
    top = feature["exemplars"]["train"]["top"]
    assert len(top) == 3 and top[0]["extreme"] >= top[-1]["extreme"]
    assert 'class="t"' in top[0]["html"] and "background:rgba" in top[0]["html"]
    assert max(top[0]["activations"]) == pytest.approx(top[0]["extreme"], rel=1e-3)
    assert feature["stats"]["max"] > 0 and feature["histogram"]["shares"] and feature["output_tokens"]
    assert feature["other_polarities"][0]["polarity"] != row["polarity"]
    assert feature["effects"]["computed"] is False and "description_effects" in feature["effects"]["message"]
    assert feature["cluster"]["computed"] is False


def test_overviews_and_the_pages(explorer):
    client, path, app = explorer
    layers = client.get("/api/layers").json()
    assert layers["described"] and len(layers["layers"]) == 4
    assert {(r["layer"], r["polarity"]) for r in layers["layers"]} == {(0, "pos"), (0, "neg"), (1, "pos"), (1, "neg")}
    page = client.get("/api/layers/1/neg", params={"size": 2}).json()
    assert page["total"] == 4 and len(page["features"]) == 2
    scores = [f["test_score"] for f in client.get("/api/layers/1/neg").json()["features"]]
    assert scores == sorted(scores, reverse=True)
    for path_ in ("/", "/features/1/neg/8", "/layers", "/layers/1/neg", "/clusters", "/clusters/1"):
        answer = client.get(path_)
        assert answer.status_code == 200 and "explorer.js" in answer.text, path_
    assert client.get("/static/explorer.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/features/{layer}/{polarity}/{index}", "/api/layers", "/api/clusters",
            "/api/clusters/{cluster_id}", "/api/steer", "/api/steer/select"} <= set(schema["paths"])


def test_clusters_when_the_store_has_them(explorer):
    client, path, _ = explorer
    assert client.get("/api/clusters").json()["computed"] is False
    assert client.get("/api/clusters/1").status_code == 404
    rows = described(path).filter(pl.col("polarity") == "pos")
    store = Store(load_config(str(path)).store_root)
    store.write("description_clusters", rows.select(
        pl.lit(1).alias("cluster"), pl.lit("a family").alias("label"), pl.lit("centroid").alias("label_source"),
        pl.lit(0.5).alias("coherence"), pl.lit(rows.height).alias("size"),
        pl.int_range(1, rows.height + 1).alias("member_rank"), "layer", "polarity", "kind", "neuron", "description",
        pl.col("test_score").alias("score"), pl.lit(0.1).alias("centroid_distance")))
    try:
        deadline = time.monotonic() + 10
        while (listed := client.get("/api/clusters").json())["computed"] is False:
            assert time.monotonic() < deadline, "the new table was not seen"
            time.sleep(0.3)
        assert listed["clusters"][0]["id"] == 1 and listed["clusters"][0]["size"] == rows.height
        cluster = client.get("/api/clusters/1").json()
        assert cluster["label"] == "a family" and len(cluster["members"]) == rows.height
        member = rows.row(0, named=True)
        feature = client.get(f"/api/features/{member['layer']}/pos/{member['neuron']}").json()
        assert feature["cluster"]["computed"] and feature["cluster"]["id"] == 1
        assert client.get("/api/clusters/7").status_code == 404
    finally:
        store.path("description_clusters").unlink()


def test_effects_when_the_store_has_them(explorer):
    client, path, _ = explorer
    store = Store(load_config(str(path)).store_root)
    rows = store.read("neuron_descriptions", 0, "pos")
    store.write("description_effects", rows.select("kind", "neuron", "description", pl.lit(0.25).alias("ablation_loss_delta"),
                                                   pl.lit(0.1).alias("agreement")), 0, "pos")
    try:
        deadline = time.monotonic() + 10
        while not (effects := client.get(f"/api/features/0/pos/{rows['neuron'][0]}").json()["effects"])["computed"]:
            assert time.monotonic() < deadline, "the new table was not seen"
            time.sleep(0.3)
        assert effects["rows"][0]["ablation_loss_delta"] == 0.25 and len(effects["rows"]) == 1
        other = client.get(f"/api/features/0/neg/{rows['neuron'][0]}").json()["effects"]
        assert other["computed"] is False and "no row for this feature" in other["message"]
    finally:
        store.path("description_effects", 0, "pos").unlink()


BAD = [
    ("/api/features/0/pos/999", 404, "was not collected"),
    ("/api/features/9/pos/5", 404, "layer 9 was not collected"),
    ("/api/features/0/up/5", 422, "polarity"),
    ("/api/features/0/pos/five", 422, "index"),
    ("/api/features/0/pos/5?kind=Bad!", 422, "kind"),
    ("/api/features/0/pos/5?kind=sae", 404, "sae"),
    ("/api/search", 422, "q"),
    ("/api/search?q=", 400, "empty"),
    ("/api/search?q=x&size=100000", 422, "size"),
    ("/api/search?q=x&page=0", 422, "page"),
    ("/api/search?q=x&page=500&size=100", 400, "narrow the search"),
    ("/api/search?q=x&mode=regex", 422, "mode"),
    ("/api/search?q=x&layer=one", 422, "layer"),
    ("/api/search?q=x&min_score=1&max_score=0", 400, "above max_score"),
    ("/api/search?q=x&min_score=nan", 200, ""),
    ("/api/layers/7/pos", 404, "no described"),
    ("/api/layers/0/pos?order=random", 422, "order"),
    ("/api/clusters/abc", 404, "not computed"),
]


def test_bad_requests_get_a_4xx_that_says_why(explorer):
    client, _, _ = explorer
    for path_, status, words in BAD:
        response = client.get(path_)
        assert response.status_code == status, (path_, response.status_code, response.text)
        if status >= 400:
            assert words in response.json()["detail"], (path_, response.text)
    for body in ({"prompt": "hi"}, {"prompt": "hi", "features": [{"layer": "0-mlp"}]}, ["not", "an", "object"]):
        response = client.post("/api/steer", json=body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert response.json()["detail"]
    response = client.post("/api/steer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    assert client.post("/api/steer/select", json={"prompt": "hi", "strength": "lots", "select": "x"}).status_code == 400


def test_steering_from_neuronpedia_and_select_requests(explorer):
    pytest.importorskip("neuron_assets.steer")
    client, path, _ = explorer
    body = {"prompt": "The pilot", "n_tokens": 4, "seed": 0, "features": [{"layer": "0-mlp", "index": 5, "strength": 8}]}
    answer = client.post("/api/steer", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["STEERED"].startswith("The pilot") and result["DEFAULT"].startswith("The pilot")
    assert client.post("/api/steer", json=body).json() == result, "the same seed gives the same answer"
    chosen = client.post("/api/steer/select", json={"prompt": "The pilot", "n_tokens": 4, "strength": 2,
                                                    "features": [{"layer": 1, "index": 8, "polarity": "neg"}]})
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["features"][0]["index"] == 8 and "text" in chosen.json()["steered"]
    missing = client.post("/api/steer/select", json={"prompt": "x", "features": [{"layer": 0, "index": 999}]})
    assert 400 <= missing.status_code < 500 and missing.json()["detail"]


def test_a_damaged_file_answers_503_with_its_fix(explorer):
    client, path, _ = explorer
    target = Store(load_config(str(path)).store_root).path("neuron_stats", 1, "pos")
    original = target.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    target.write_bytes(bytes(damaged))
    try:
        response = client.get("/api/features/1/pos/8")
        assert response.status_code == 503 and "damaged" in response.json()["detail"], response.text
        assert "materialize" in response.json()["detail"]
    finally:
        target.write_bytes(original)
    assert client.get("/api/features/1/pos/8").status_code == 200


def test_parallel_searches_each_get_their_own_answer(explorer):
    """Each request searches on a cursor of its own (its query vector its own): 16 searches at
    once answer as they do one at a time."""
    client, path, _ = explorer
    queries = described(path)["description"].unique().sort().to_list()[:16]
    alone = {q: client.get("/api/search", params={"q": q, "size": 3}).json()["hits"] for q in queries}
    together: dict[str, list] = {}

    def ask(query: str) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            together[query] = own.get("/api/search", params={"q": query, "size": 3}).json()["hits"]

    threads = [threading.Thread(target=ask, args=(q,)) for q in queries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def test_reads_keep_answering_while_a_writer_replaces_the_files(explorer):
    """A writer rewrites every partition of three tables (temp file, rename) as fast as it can
    while 8 clients read features and search, beside a half-written temporary file: every
    answer is a 200 with whole data."""
    client, path, _ = explorer
    store = Store(load_config(str(path)).store_root)
    tables = {table: {p: store.read(table, *p) for p in store.partitions(table)}
              for table in ("neuron_descriptions", "neuron_stats", "exemplars")}
    stop = threading.Event()
    writes = []

    def writer():
        while not stop.is_set():
            for table, partitions in tables.items():
                for (layer, polarity), frame in partitions.items():
                    store.write(table, frame, layer, polarity)
                    writes.append(table)

    failures, answers = [], []
    urls = ["/api/features/0/pos/5", "/api/features/1/neg/8", "/api/search?q=words&mode=text",
            "/api/search?q=the%20words", "/api/layers", "/api/layers/0/neg"]

    def reader(offset: int):
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            for i in range(12):
                response = own.get(urls[(i + offset) % len(urls)])
                answers.append(response.status_code)
                if response.status_code != 200:
                    failures.append((response.request.url, response.status_code, response.text[:300]))

    # A writer's half-written file, as a run killed mid-write leaves it: no view or read sees it.
    half = store.path("neuron_descriptions", 0, "pos").with_name(".data.parquet.half.tmp")
    half.write_bytes(store.path("neuron_descriptions", 0, "pos").read_bytes()[:200])
    writing = threading.Thread(target=writer)
    writing.start()
    try:
        readers = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
    finally:
        stop.set()
        writing.join()
        half.unlink()
    assert failures == [] and len(answers) == 96
    assert len(writes) > 12, "the writer ran beside the readers"


def test_serve_refuses_a_port_in_use(explorer, capsys):
    client, path, _ = explorer
    busy = int(str(client.base_url).rsplit(":", 1)[1])
    assert main(["--config", str(path), "serve", "--port", str(busy)]) == 1
    assert f"port {busy}" in capsys.readouterr().err


def test_dagster_metadata_links_to_the_explorer(explorer, monkeypatch):
    """neuron_descriptions' metadata carries the explorer's layer page and best feature's page
    as Dagster url values; the base URL comes from NEURON_ASSETS_EXPLORER_URL, and the link
    opens the feature on a running explorer."""
    import dagster as dg

    from neuron_assets.defs.template import dagster_metadata
    from neuron_assets.report.metadata import explorer_links

    client, path, _ = explorer
    rows = described(path).filter((pl.col("layer") == 1) & (pl.col("polarity") == "neg"))
    best = rows.sort("test_score", descending=True).row(0, named=True)
    assert explorer_links(rows) == {"explorer": "http://127.0.0.1:8000/layers/1/neg",
                                    "explorer_best_feature": f"http://127.0.0.1:8000/features/1/neg/{best['neuron']}"}
    assert explorer_links(described(path))["explorer"] == "http://127.0.0.1:8000/layers"
    monkeypatch.setenv("NEURON_ASSETS_EXPLORER_URL", str(client.base_url).rstrip("/") + "/")
    links = dagster_metadata(explorer_links(rows))
    assert isinstance(links["explorer_best_feature"], dg.UrlMetadataValue)
    url = links["explorer_best_feature"].value
    assert url.startswith(str(client.base_url).rstrip("/") + "/features/1/neg/")
    assert client.get(url.replace("/features/", "/api/features/")).json()["feature"]["index"] == best["neuron"]
