"""Config checking shared by every ``create()``: one clear ``ValueError`` naming the key."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad config value: the message names the key and the nearest valid choices."""


# Names users write for a key or choice that has another name here (other libraries' spellings,
# optax's function names for the schedules and losses).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate",),
    "wd": ("weight_decay",),
    "betas": ("b1", "b2"),
    "beta1": ("b1",),
    "beta2": ("b2",),
    "every_k_schedule": ("accumulate_steps",),
    "gradient_accumulation_steps": ("accumulate_steps",),
    "warmup_constant_schedule": ("linear_warmup",),
    "cosine_onecycle_schedule": ("one_cycle",),
    "linear_onecycle_schedule": ("one_cycle",),
    "squared_error": ("mse",),  # optax.losses' names
    "l2_loss": ("l2",),
    "huber_loss": ("huber",),
}
# Suffixes of optax's schedule functions: 'cosine_decay_schedule' is 'cosine' here.
_OPTAX_SUFFIXES = ("_decay_schedule", "_schedules", "_schedule", "_decay")


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Returns up to ``n`` of ``choices`` closest to ``name`` (best first): the same name in
    another case, a known synonym (:data:`SYNONYMS`), then the closest spellings."""
    choices = sorted(set(choices))
    lowered = name.lower()
    by_lower = {c.lower(): c for c in choices}
    found = [by_lower[lowered]] if lowered in by_lower else []
    found += [c for c in SYNONYMS.get(lowered, ()) if c in choices]
    forms = [lowered[: -len(s)] for s in _OPTAX_SUFFIXES if lowered.endswith(s)] + [lowered]
    for form in forms:
        close = difflib.get_close_matches(form, choices, n=n, cutoff=0.5)
        # Only the spellings about as close as the closest ('num_train_steps' for
        # 'num_train_step', not also 'profile_steps').
        ratios = [difflib.SequenceMatcher(None, form, c).ratio() for c in close]
        found += [c for c, r in zip(close, ratios, strict=True) if r >= max(ratios) - 0.2]
    if not found:
        found = [c for c in choices if lowered in c.lower() or c.lower() in lowered]
    return list(dict.fromkeys(found))[:n]


def unknown(what: str, key: str, name: Any, choices: Iterable[str]) -> ConfigError:
    """Builds the error for an unknown name: ``unknown optimizer 'adamm' at optimizer.name
    (did you mean 'adam', 'adamw'?); valid: ...``."""
    choices = sorted(set(choices))
    close = nearest(str(name), choices)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    listing = ", ".join(choices) if len(choices) <= 60 else ", ".join(choices[:60]) + ", ..."
    return ConfigError(f"unknown {what} {name!r} at {key}{hint}; valid: {listing or 'none'}")


def as_dict(config: Any) -> dict[str, Any]:
    """Returns a plain dict view of a ConfigDict, FrozenConfigDict, mapping or ``None``."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise ConfigError(f"expected a dict or ConfigDict, got {type(config).__name__}: {config!r}")


def check_keys(config: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raises ``ConfigError`` for the first key of ``config`` not in ``valid``."""
    valid = set(valid)
    for key in config:
        if key not in valid:
            raise unknown("key", f"{where}.{key}", key, valid)


def check_option_keys(
    config: Mapping[str, Any],
    valid: Iterable[str],
    where: str,
    what: str,
    name: str,
    choices: Mapping[str, Iterable[str]],
) -> None:
    """Like :func:`check_keys` for the options of the ``what`` called ``name``; a key that is an
    option of another of ``choices`` says so (typically ``--config.<where>.name=...`` switched
    the name on the command line and kept the old one's options)."""
    valid = set(valid)
    for key in config:
        if key in valid:
            continue
        owners = sorted(n for n, options in choices.items() if n != name and key in options)
        if not owners:
            raise unknown("key", f"{where}.{key}", key, valid)
        listing = ", ".join(sorted(valid - {"name"})) or "none"
        others = ", ".join(repr(o) for o in owners[:3]) + (", ..." if owners[3:] else "")
        kept = {"name": name, **{k: v for k, v in config.items() if k in valid and k != "name"}}
        raise ConfigError(
            f"{where}.{key} is not an option of {what} {name!r} (its options: {listing}) but of "
            f"{others}; --config.{where}.name=... keeps the config file's other keys: to switch "
            f'on the command line give the whole dict, --config.{where}="{_literal(kept)}" '
            "(keys left out take their defaults), or switch it in the config file"
        )


def _literal(value: Mapping[str, Any]) -> str:
    """``value`` as a Python dict literal (what ml_collections parses for a ConfigDict field)."""
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in value.items()) + "}"


def check_positive_int(value: Any, key: str) -> None:
    """Raises ``ConfigError`` unless ``value`` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an int >= 1, got {value!r}")


def check_batch_divides(batch_size: int, key: str, num_devices: int) -> None:
    """Raises ``ConfigError`` unless a global ``batch_size`` splits evenly over ``num_devices``."""
    if batch_size % num_devices:
        raise ConfigError(
            f"{key}={batch_size} does not divide over the {num_devices} devices; "
            f"use a multiple of {num_devices}"
        )


def check_positive_ints(value: Any, key: str) -> None:
    """Raises ``ConfigError`` unless ``value`` is a non-empty list or tuple of ints >= 1."""
    if (
        not isinstance(value, list | tuple)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ConfigError(
            f"{key} must be a non-empty tuple of ints >= 1, e.g. (32, 64); got {value!r}"
        )


def check_named(
    config: Any, choices: Mapping[str, Mapping[str, Any]], where: str, what: str
) -> dict[str, Any]:
    """Checks a ``dict(name=..., **options)`` config against its choices; returns the options.

    ``choices`` maps each valid name to its options, each option to a check
    ``(value, key) -> None`` (or ``None`` for no check). An unknown name, an unknown option or a
    bad value raises ``ConfigError`` naming ``where.name`` / ``where.option``.
    """
    cfg = as_dict(config)
    name = cfg.pop("name", None)
    if name not in choices:
        raise unknown(what, f"{where}.name", name, choices)
    options = choices[name]
    check_option_keys(cfg, options, where, what, name, choices)
    for key, value in cfg.items():
        if options[key] is not None:
            options[key](value, f"{where}.{key}")
    return cfg


def check_fraction(value: Any, key: str) -> None:
    """Raises ``ConfigError`` unless ``value`` is a number in [0, 1) (a rate, e.g. dropout)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{key} must be a number in [0, 1), got {value!r}")


def check_bool(value: Any, key: str) -> None:
    """Raises ``ConfigError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be True or False, got {value!r}")


def check_one_of(*choices: str) -> Callable[[Any, str], None]:
    """A check that ``value`` is one of ``choices``."""

    def check(value: Any, key: str) -> None:
        if value not in choices:
            listing = ", ".join(map(repr, choices))
            raise ConfigError(f"{key} must be one of {listing}; got {value!r}")

    return check
