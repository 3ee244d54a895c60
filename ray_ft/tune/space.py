"""What a search samples and what one sampled point means: the Tune ``param_space`` over LoRA ``r``,
``alpha`` (or ``alpha_multiple``), learning rate and dropout, and each trial's full experiment config."""

from __future__ import annotations

from typing import Any

from ray_ft.config import ConfigError, ExperimentConfig, SearchConfig

HYPERPARAMETERS = ("r", "alpha", "lr", "dropout")
SEARCH_METRICS = ("val_loss", "loss")
"""Metrics the training loop reports at every evaluation, which a search can optimise."""


def search_space(search: SearchConfig) -> dict[str, Any]:
    """The Tune ``param_space``: ``r`` and ``alpha`` (or ``alpha_multiple``) as choices, ``lr`` log-uniform."""
    from ray import tune

    space: dict[str, Any] = {"r": tune.choice(search.r)}
    if search.alpha:
        space["alpha"] = tune.choice(search.alpha)
    elif search.alpha_multiple:
        space["alpha_multiple"] = tune.choice(search.alpha_multiple)
    low, high = search.lr
    space["lr"] = tune.loguniform(low, high) if low < high else low
    if search.dropout:
        space["dropout"] = tune.choice(search.dropout)
    return space


def searched(search: SearchConfig) -> list[str]:
    """The hyper-parameters that vary between trials (the others are fixed by the config)."""
    names = ["r", "alpha"] if (search.alpha or search.alpha_multiple) else ["r"]
    if search.lr[0] < search.lr[1]:
        names.append("lr")
    if search.dropout:
        names.append("dropout")
    return names


def search_space_text(search: SearchConfig) -> str:
    """The search space in words, for progress lines."""
    parts = [f"r {search.r}"]
    if search.alpha:
        parts.append(f"alpha {search.alpha}")
    elif search.alpha_multiple:
        parts.append(f"alpha {search.alpha_multiple} x r")
    low, high = search.lr
    parts.append(f"lr log-uniform [{low:g}, {high:g}]" if low < high else f"lr {low:g}")
    if search.dropout:
        parts.append(f"dropout {search.dropout}")
    return ", ".join(parts)


def resolve_hyperparameters(sampled: dict[str, Any], base: ExperimentConfig) -> dict[str, Any]:
    """Turn a sampled point into concrete ``r``, ``alpha``, ``lr``, ``dropout`` (the rest from ``base``)."""
    r = int(sampled.get("r", base.method.r))
    if "alpha" in sampled:
        alpha = int(sampled["alpha"])
    elif "alpha_multiple" in sampled:
        alpha = max(1, round(float(sampled["alpha_multiple"]) * r))
    else:
        alpha = base.method.alpha
    return {
        "r": r,
        "alpha": alpha,
        "lr": float(sampled.get("lr", base.train.lr)),
        "dropout": float(sampled.get("dropout", base.method.dropout)),
    }


def trial_config(base: ExperimentConfig, hyperparameters: dict[str, Any]) -> ExperimentConfig:
    """``base`` with one trial's LoRA ``r``/``alpha``/``dropout`` and learning rate filled in."""
    data = base.to_dict()
    data["method"].update(r=hyperparameters["r"], alpha=hyperparameters["alpha"], dropout=hyperparameters["dropout"])
    data["train"]["lr"] = hyperparameters["lr"]
    return ExperimentConfig.model_validate(data)


def check_search(cfg: ExperimentConfig, n_val: int) -> None:
    """Refuse searches that cannot work, naming the field."""
    fields = type(cfg.method).model_fields
    if not {"r", "alpha", "dropout"} <= set(fields):
        raise ConfigError([f"method.name: ray-ft tune searches LoRA r/alpha; method {cfg.method.name!r} has no r"])
    if cfg.tune.metric not in SEARCH_METRICS:
        raise ConfigError(
            [f"tune.metric: {cfg.tune.metric!r} is not reported by training; choose one of {SEARCH_METRICS}"]
        )
    if cfg.tune.metric.startswith("val_") and n_val == 0:
        raise ConfigError([f"tune.metric: {cfg.tune.metric!r} needs validation data; set data.val_fraction > 0"])
    if cfg.tune.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(["tune.search_alg: 'optuna' needs the optuna package (pip install optuna)"]) from None
