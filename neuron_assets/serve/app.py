"""The explorer's web app: HTML pages (static files of this package, filled in by their script
from the JSON API) and the JSON API itself, documented at /docs (FastAPI's OpenAPI schema at
/openapi.json).

    create_app(config)  ->  a FastAPI app; `neuron-assets serve` runs it with uvicorn

Pages: /  (search), /features/{layer}/{polarity}/{index}?kind=, /layers, /layers/{layer}/{polarity},
/clusters, /clusters/{id}. Every route but steering is a plain function, run in FastAPI's
threadpool on a cursor of its own (see :mod:`neuron_assets.serve.explorer`). A request the
explorer cannot answer gets a 4xx with ``{"detail": "<what is wrong and what to do>"}``:
400 for a malformed one, 404 for what the store does not have, 422 for a parameter of the
wrong type.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from neuron_assets.config import Config
from neuron_assets.search import Filters
from neuron_assets.serve.explorer import MAX_PAGE_SIZE, BadRequest, Explorer
from neuron_assets.serve.steering import Steering, SteeringUnavailable
from neuron_assets.store import DamagedTableError, Store

STATIC = Path(__file__).resolve().parent / "static"
KIND_PATTERN = r"^[a-z][a-z0-9_]*$"


def create_app(config: Config, store: Store | None = None, explorer: Explorer | None = None,
               steering: Steering | None = None) -> FastAPI:
    store = store or Store(config.store_root)
    explorer = explorer or Explorer(store)
    steering = steering or Steering(config, store)
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=explorer.warm, name="explorer-warm-up", daemon=True).start()
        yield

    app = FastAPI(title="neuron_assets explorer", version="1", lifespan=lifespan,
                  description="Search the description database, read a feature's exemplars, descriptions and "
                              "scores, and steer the subject model. Read-only over the store.")
    app.state.explorer, app.state.steering = explorer, steering
    _errors(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- pages ----------------------------------------------------------------------------------
    def page(name: str):
        return FileResponse(STATIC / name, media_type="text/html")

    @app.get("/", include_in_schema=False)
    def search_page():
        return page("index.html")

    @app.get("/features/{layer}/{polarity}/{index}", include_in_schema=False)
    def feature_page(layer: int, polarity: Literal["pos", "neg"], index: int):
        return page("feature.html")

    @app.get("/layers", include_in_schema=False)
    def layers_page():
        return page("layers.html")

    @app.get("/layers/{layer}/{polarity}", include_in_schema=False)
    def layer_page(layer: int, polarity: Literal["pos", "neg"]):
        return page("layer.html")

    @app.get("/clusters", include_in_schema=False)
    def clusters_page():
        return page("clusters.html")

    @app.get("/clusters/{cluster_id}", include_in_schema=False)
    def cluster_page(cluster_id: str):
        return page("cluster.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return RedirectResponse("/static/favicon.svg")

    # -- the API ----------------------------------------------------------------------------------
    @app.get("/api/search", tags=["search"], summary="Descriptions ranked by meaning or by words")
    def search(q: str = Query(..., max_length=500, description="what to look for, e.g. closing brackets"),
               mode: Literal["semantic", "text"] = Query("semantic", description="semantic (MiniLM vectors) or text (BM25)"),
               layer: int | None = Query(None, ge=0), polarity: Literal["pos", "neg"] | None = None,
               kind: str | None = Query(None, pattern=KIND_PATTERN, description="neuron or sae"),
               min_score: float | None = Query(None, description="the selected description's test score, at least"),
               max_score: float | None = Query(None, description="the selected description's test score, at most"),
               simulator: str | None = Query(None, max_length=200, description="the selecting scorer's simulator"),
               page: int = Query(1, ge=1), size: int = Query(20, ge=1, le=MAX_PAGE_SIZE)) -> dict:
        filters = Filters(layer=layer, polarity=polarity, min_score=min_score, kind=kind, max_score=max_score,
                          simulator=simulator)
        return explorer.search(q, mode, filters, page, size)

    @app.get("/api/filters", tags=["search"], summary="What the search filters can be set to")
    def filters() -> dict:
        return explorer.filter_choices()

    @app.get("/api/features/{layer}/{polarity}/{index}", tags=["features"],
             summary="A feature: description, every candidate and score, statistics, histogram, exemplars, "
                     "output tokens, effects, cluster")
    def feature(layer: int, polarity: Literal["pos", "neg"], index: int,
                kind: str = Query("neuron", pattern=KIND_PATTERN, description="neuron, or sae for an SAE latent")) -> dict:
        return explorer.feature(layer, polarity, index, kind)

    @app.get("/api/layers", tags=["overviews"], summary="Per layer x polarity x kind: how well the descriptions score")
    def layers() -> dict:
        return explorer.layers()

    @app.get("/api/layers/{layer}/{polarity}", tags=["overviews"], summary="A layer's described features, best first")
    def layer_features(layer: int, polarity: Literal["pos", "neg"],
                       kind: str = Query("neuron", pattern=KIND_PATTERN),
                       order: Literal["test_score", "val_score", "neuron"] = "test_score",
                       page: int = Query(1, ge=1), size: int = Query(50, ge=1, le=MAX_PAGE_SIZE)) -> dict:
        return explorer.layer_features(layer, polarity, kind, page, size, order)

    @app.get("/api/clusters", tags=["overviews"], summary="Every cluster of descriptions (description_clusters)")
    def clusters() -> dict:
        return explorer.clusters()

    @app.get("/api/clusters/{cluster_id}", tags=["overviews"], summary="One cluster and its members")
    def cluster(cluster_id: str) -> dict:
        return explorer.cluster(cluster_id)

    @app.post("/api/steer", tags=["steer"], summary="Steer the subject model: Neuronpedia's /api/steer request and response")
    def steer(body: dict = Body(..., examples=[{"prompt": "The weather today is", "n_tokens": 16, "seed": 0,
                                                 "features": [{"layer": 0, "index": 5, "strength": 4.0}]}])) -> dict:
        return steering.neuronpedia(body)

    @app.post("/api/steer/select", tags=["steer"],
              summary="Steer the features whose descriptions match a query (SteerRequest.from_dict)")
    def steer_select(body: dict = Body(..., examples=[{"prompt": "The weather today is", "select": "punctuation",
                                                        "top": 5, "strength": 1.0, "tokens": 16}])) -> dict:
        return steering.select(body)

    @app.get("/api/health", tags=["meta"], summary="Whether the server answers, and its store")
    def health() -> dict:
        return {"ok": True, "store": str(store.root)}

    return app


def _errors(app: FastAPI) -> None:
    """Errors as 4xx answers that say what is wrong; a damaged file as 503 with its fix."""

    def answer(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return answer(400, str(err))

    @app.exception_handler(DamagedTableError)
    async def damaged(request: Request, err: DamagedTableError):
        return answer(503, str(err))

    @app.exception_handler(SteeringUnavailable)
    async def no_steering(request: Request, err: SteeringUnavailable):
        return answer(503, str(err))

    @app.exception_handler(LookupError)
    async def not_found(request: Request, err: LookupError):
        return answer(404, str(err.args[0]) if err.args else str(err))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, err: ValueError):
        return answer(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = []
        for problem in err.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("query", "path", "body"))
            problems.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}"
                            + (f" (got {problem['input']!r})" if "input" in problem and not isinstance(problem["input"], dict) else ""))
        return answer(422, "; ".join(problems) or "invalid request")
