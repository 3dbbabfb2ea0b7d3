"""The Celery app of the celery executor's workers (``NEURON_ASSETS_EXECUTOR=celery``):

    NEURON_ASSETS_CONFIG=/config/run.yaml NEURON_ASSETS_EXECUTOR=celery \\
        celery -A neuron_assets.defs.celery_worker worker -Q gpu,cpu --concurrency 1

Built as the executor builds its own (:func:`neuron_assets.defs.executor.celery_settings`: the
same broker, backend, late acknowledgement and visibility timeout), with dagster-celery's task
that runs one step. A worker on a GPU node takes ``-Q gpu`` (or ``gpu,cpu``), a CPU node ``-Q
cpu``. Each worker loads the code location itself, from its own environment: the same config
file, and the store root it names, is all that the workers and the run share with each other
(and the Dagster instance, which the executor sends to each step).
"""

from __future__ import annotations

from dagster._core.execution.retries import RetryMode
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from neuron_assets.defs.executor import celery_settings

_settings = celery_settings()
app = make_app(CeleryExecutor(retries=RetryMode(RetryMode.DISABLED), broker=_settings["broker"],
                              backend=_settings["backend"], config_source=_settings["config_source"]).app_args())
execute_plan = create_task(app)
