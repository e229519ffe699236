"""Stage 3, ``medq tune``: a keras-tuner search whose best trial becomes the run's model when it beats the trained one.

- :mod:`medq.tune.space`: ``tune.search_space`` → keras-tuner hyperparameters (checked), a trial's values → settings
- :mod:`medq.tune.report`: the trial table (CSV, Markdown), the best and trade-off picks, the trade-off plot
- :mod:`medq.tune.stage`: the search itself, each trial a :func:`medq.fitting.fit_model` training, and the selection
- :mod:`medq.tune.kt_private`: the only module that uses keras-tuner's internals (``keras_tuner.src``): the chief's
  oracle server with its heartbeats, dropped workers and requeued trials, ``trial.json``, the version check
"""
from medq.tune.stage import TuneResult, run_tune

__all__ = ["TuneResult", "run_tune"]
