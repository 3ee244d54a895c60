"""Hyper-parameter search over LoRA ``r``, ``alpha`` and learning rate with Ray Tune and ASHA.

Every Tune trial runs :func:`~ray_ft.tune.trial.train_driver_fn`, a function trainable that builds one
distributed ``TorchTrainer`` for its sampled hyper-parameters; ASHA stops weak trials after a few steps. The
``tune`` section of the experiment config (:class:`ray_ft.config.SearchConfig`) holds the search space and the
scheduler settings.

Modules, one concern each: :mod:`~ray_ft.tune.space` (search space, a trial's config, input checks),
:mod:`~ray_ft.tune.trial` (the per-trial function and its MLflow child run), :mod:`~ray_ft.tune.driver` (the
``Tuner``, ASHA, resume, the parent run), :mod:`~ray_ft.tune.report` (outcomes from
``ResultGrid.get_dataframe()``, tables, plot, summary), :mod:`~ray_ft.tune.export` (the best trial's model, the
top adapters, ``--deploy``) and :mod:`~ray_ft.tune.command` (``ray-ft tune``).

Output layout under ``output_dir``::

    config.yaml         the resolved search config     search.json   MLflow parent run id + tracking URI
    ray/<name>/         the Tune experiment (resume)   ray/<name>-trials/trial_<id>/   Train checkpoints
    trials.csv|.md      one row per trial              search_plot.png   metric vs each hyper-parameter
    best_config.yaml    the best trial's full config (``ray-ft train best_config.yaml``)
    trainable/ merged/  the best trial's trained parameters and servable model
    top/top<rank>-<id>/ the best trials' LoRA adapters (``ray-ft serve`` serves them on one engine)

MLflow: one parent run for the search and one nested child run per trial (tag ``mlflow.parentRunId``)
holding the trial's hyper-parameters, resolved config and per-step curves.
"""

from ray_ft.tune.command import tune_command
from ray_ft.tune.driver import SEARCH_STATE_FILE, concurrent_trials, run_search
from ray_ft.tune.export import TOP_ADAPTERS, export_top_adapters
from ray_ft.tune.report import (
    EARLY_STOPPED,
    FAILED,
    FINISHED,
    SearchSummary,
    TrialOutcome,
    print_summary,
    summary_text,
)
from ray_ft.tune.space import (
    HYPERPARAMETERS,
    SEARCH_METRICS,
    check_search,
    resolve_hyperparameters,
    search_space,
    search_space_text,
    trial_config,
)
from ray_ft.tune.trial import DRIVER_CPU, SearchContext, train_driver_fn, trial_resources

__all__ = [
    "DRIVER_CPU",
    "EARLY_STOPPED",
    "FAILED",
    "FINISHED",
    "HYPERPARAMETERS",
    "SEARCH_METRICS",
    "SEARCH_STATE_FILE",
    "TOP_ADAPTERS",
    "SearchContext",
    "SearchSummary",
    "TrialOutcome",
    "check_search",
    "concurrent_trials",
    "export_top_adapters",
    "print_summary",
    "resolve_hyperparameters",
    "run_search",
    "search_space",
    "search_space_text",
    "summary_text",
    "train_driver_fn",
    "trial_config",
    "trial_resources",
    "tune_command",
]
