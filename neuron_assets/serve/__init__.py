"""The explorer: a web app and JSON API over the description database (`neuron-assets serve`).

- :mod:`~neuron_assets.serve.app`: the FastAPI app, its pages and routes (`create_app`);
- :mod:`~neuron_assets.serve.explorer`: what it reads (search, a feature, overviews), read-only
  beside a run that writes the store;
- :mod:`~neuron_assets.serve.feature`: a feature as JSON, its exemplars as heat-maps;
- :mod:`~neuron_assets.serve.steering`: the one steerer behind the steering endpoints;
- :mod:`~neuron_assets.serve.links`: paths and URLs of the pages (the Dagster UI links to them);
- ``static/``: the pages, their script and style (shipped in the package; nothing is fetched).
"""
