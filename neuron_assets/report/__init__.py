"""What people look at: neuron pages, the HTML report, figures and highlighted text.

- :mod:`~neuron_assets.report.neuron`: one neuron's statistics, exemplars, candidates and
  every score, read with filtered scans (what `neuron-assets show` prints);
- :mod:`~neuron_assets.report.html`: self-contained pages, token heat-maps;
- :mod:`~neuron_assets.report.site`: the static report (index, layer x polarity pages,
  neuron pages) under ``<root>/report/``;
- :mod:`~neuron_assets.report.plots`: matplotlib figures as PNG bytes;
- :mod:`~neuron_assets.report.render`: terminal and markdown highlighting, markdown tables.
"""
