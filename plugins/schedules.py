"""Learning-rate schedules from config: ``create(optimizer_config, *, total_steps)``.

The schedule gives the **absolute** learning rate at every optimizer step. Its peak is
``optimizer.learning_rate``; its shape comes from ``optimizer.schedule``, a dict with ``name``
and that schedule's keys (a bare string such as ``schedule='cosine'`` means
``dict(name='cosine')``; no schedule, or ``None``, means constant)::

    optimizer = ConfigDict(dict(
        name='adamw',
        learning_rate=1e-3,                      # the peak
        schedule=dict(name='warmup_cosine', warmup_steps=0.05, end_value=1e-5),
    ))
    schedule = plugins.schedules.create(optimizer, total_steps=10_000)
    schedule(500)   # -> 1e-3, the end of the warmup

``total_steps`` counts optimizer steps: with ``optimizer.accumulate_steps = k`` the trainer's
``num_train_steps // k``.

Lengths
-------
Every length (``warmup_steps``, ``decay_steps``, ``transition_steps``, ``transition_begin``,
``cycle_steps``, a phase's ``steps``, piecewise boundaries) is either

- an **int**: a number of steps (``warmup_steps=500``; ``1`` means one step), or
- a **float in (0, 1]**: a fraction of ``total_steps``, rounded to the nearest step
  (``warmup_steps=0.05`` is 5% of training; ``1.0`` is all of it). Integral floats above 1
  (``1e4``) are step counts.

Negative lengths and a warmup longer than training are errors.

Schedules
---------
Defaults are shown; keys without one are required. ``peak`` is ``optimizer.learning_rate`` and
``total`` is ``total_steps``.

``constant``
    ``peak`` at every step. No keys.
``linear_warmup`` (``warmup_steps``, ``init_value=0.0``)
    Linear from ``init_value`` to ``peak`` over ``warmup_steps``, then constant
    (``optax.warmup_constant_schedule``).
``cosine`` (``decay_steps=total``, ``end_value=0.0`` *or* ``alpha``, ``exponent=1.0``)
    Cosine decay from ``peak`` to ``end_value`` (``= alpha * peak``) over ``decay_steps``, then
    constant (``optax.cosine_decay_schedule``).
``warmup_cosine`` (``warmup_steps=0``, ``decay_steps=total``, ``end_value=0.0``,
``init_value=0.0``, ``exponent=1.0``)
    Linear warmup, then cosine decay that reaches ``end_value`` at ``decay_steps`` -- warmup
    included, as optax's ``decay_steps`` -- and holds it to ``total``
    (``optax.warmup_cosine_decay_schedule``).
``warmup_linear`` (``warmup_steps=0``, ``end_value=0.0``, ``init_value=0.0``)
    Linear warmup, then linear decay reaching ``end_value`` at ``total``.
``exponential`` (``transition_steps``, ``decay_rate``, ``staircase=False``,
``transition_begin=0``, ``end_value=None``)
    ``peak * decay_rate ** ((step - transition_begin) / transition_steps)``, floored to
    ``end_value`` when given (``optax.exponential_decay``).
``piecewise_constant`` (``boundaries_and_scales`` *or* ``boundaries`` + ``scales``)
    ``peak`` multiplied by every scale whose boundary has been reached
    (``optax.piecewise_constant_schedule``): ``{'5000': 0.1, '8000': 0.1}`` gives ``peak``,
    ``peak / 10`` from step 5000, ``peak / 100`` from step 8000. Keys may be ints or strings
    (a ConfigDict only allows string keys). Boundaries are steps, or fractions of ``total`` as
    floats: ``boundaries=[0.5, 0.75], scales=[0.1, 0.1]`` (a ConfigDict refuses dotted keys
    such as ``'0.5'``; a plain dict takes them).
``rsqrt`` (``warmup_steps=0``, ``timescale=warmup_steps``, ``init_value=0.0``)
    Linear warmup, then inverse square root decay
    ``peak / sqrt(1 + (step - warmup_steps) / timescale)``, which with the default timescale is
    ``peak * sqrt(warmup_steps / step)``. Needs ``warmup_steps > 0`` or a ``timescale``.
``warmup_stable_decay`` or ``wsd`` (``warmup_steps=0``, ``decay_steps=0.2``, ``end_value=0.0``,
``init_value=0.0``, ``decay_shape='linear'``)
    Linear warmup, constant ``peak``, then a final decay of ``decay_steps`` steps to ``end_value``
    at ``total``; ``decay_shape`` is ``'linear'``, ``'cosine'`` or ``'sqrt'``
    (``1 - sqrt(t / decay_steps)``).
``one_cycle`` (``pct_start=0.3``, ``div_factor=25.0``, ``final_div_factor=1e4``)
    ``optax.cosine_onecycle_schedule`` over ``total``: cosine up from ``peak / div_factor`` to
    ``peak`` at ``pct_start * total``, then down to ``peak / (div_factor * final_div_factor)``.
``sgdr`` (``num_cycles`` *or* ``cycle_steps``, ``cycle_mult=1.0``, ``warmup_steps=0``,
``init_value=0.0``, ``end_value=0.0``, ``exponent=1.0``)
    Cosine decay with warm restarts (``optax.sgdr_schedule``). ``num_cycles`` splits ``total``
    into that many cycles; ``cycle_steps`` is the first cycle's length, repeated until the end of
    training. Each cycle is ``cycle_mult`` times longer than the previous one (``>= 1``) and starts
    with ``warmup_steps`` of linear warmup from ``init_value``.
``join`` (``phases``)
    Phases run end to end (``optax.join_schedules``); each phase restarts its step count at 0.
    A phase is a schedule dict plus ``steps`` (its length; an int or a fraction of ``total``) and
    an optional ``learning_rate`` (its own peak; default ``optimizer.learning_rate``). Inside a
    phase, fractions are fractions of the phase's length and the phase's length is its ``total``.
    The lengths must add up to ``total``; one phase may leave out ``steps`` and take the rest::

        schedule=dict(name='join', phases=[
            dict(name='linear_warmup', warmup_steps=1.0, steps=500),
            dict(name='constant', steps=0.5),
            dict(name='cosine', end_value=1e-5),      # the rest
        ])

Errors
------
Every problem raises :class:`plugins.config_errors.ConfigError` (a ``ValueError``) from
``create()``, before anything compiles, naming the key (``optimizer.schedule.warmup_steps``) and,
for unknown names and keys, the nearest valid choices ("did you mean 'warmup_cosine'?").

Also here: :func:`curve` (the learning rate at every step as a numpy array), :func:`text_plot`
(an ASCII chart) and :func:`save_plot` (a PNG). The command ``plugins-lr-curve`` (or
``python -m plugins.lr_curve``) shows both for a config file.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plugins.config_errors import ConfigError, as_dict, check_option_keys, unknown

__all__ = ["NAMES", "ALIASES", "create", "curve", "save_plot", "text_plot"]

# Keys each schedule accepts (besides ``name``).
_KEYS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear_warmup": ("warmup_steps", "init_value"),
    "cosine": ("decay_steps", "end_value", "alpha", "exponent"),
    "warmup_cosine": ("warmup_steps", "decay_steps", "end_value", "init_value", "exponent"),
    "warmup_linear": ("warmup_steps", "end_value", "init_value"),
    "exponential": (
        "transition_steps",
        "decay_rate",
        "staircase",
        "transition_begin",
        "end_value",
    ),
    "piecewise_constant": ("boundaries_and_scales", "boundaries", "scales"),
    "rsqrt": ("warmup_steps", "timescale", "init_value"),
    "warmup_stable_decay": (
        "warmup_steps",
        "decay_steps",
        "end_value",
        "init_value",
        "decay_shape",
    ),
    "one_cycle": ("pct_start", "div_factor", "final_div_factor"),
    "sgdr": (
        "num_cycles",
        "cycle_steps",
        "cycle_mult",
        "warmup_steps",
        "init_value",
        "end_value",
        "exponent",
    ),
    "join": ("phases",),
}

#: The valid schedule names (``optimizer.schedule.name``), aliases included.
ALIASES: dict[str, str] = {"wsd": "warmup_stable_decay"}
NAMES: tuple[str, ...] = tuple(_KEYS) + tuple(ALIASES)

_PHASE_KEYS = ("steps", "learning_rate")
_REQUIRED = object()


# ----------------------------------------------------------------------------------------------
# Reading and checking values.


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _to_length(value: Any, key: str, total: int) -> int:
    """An int number of steps, or a float in (0, 1] as a fraction of ``total``."""
    if not _is_number(value):
        raise ConfigError(
            f"{key} must be an int number of steps or a float fraction of total_steps in (0, 1], "
            f"got {value!r}"
        )
    if value < 0:
        raise ConfigError(f"{key} must not be negative, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if value <= 1.0:
        return int(round(value * total))
    if value.is_integer():
        return int(value)
    raise ConfigError(
        f"{key} must be an int number of steps or a fraction of total_steps in (0, 1], "
        f"got {value!r}"
    )


class _Reader:
    """Typed access to one schedule dict, with errors naming ``where.key``."""

    def __init__(self, config: Mapping[str, Any], where: str, total: int):
        self.config = config
        self.where = where
        self.total = total
        self.name = config.get("name")

    def key(self, key: str) -> str:
        return f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.config.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"missing key {self.key(key)}: schedule {self.name!r} needs it")
            return default
        return value

    def length(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.raw(key, default)
        return _to_length(value, self.key(key), self.total)

    def number(
        self,
        key: str,
        default: Any = _REQUIRED,
        *,
        low: float | None = None,
        low_open: bool = False,
        high: float | None = None,
        high_open: bool = False,
    ) -> float:
        value = self.raw(key, default)
        if value is None:  # an optional key whose default is None
            return None  # type: ignore[return-value]
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ConfigError(f"{self.key(key)} must be a finite number, got {value!r}")
        value = float(value)
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            if low is not None and high is not None:
                rng = f"in {lo}, {hi}"
            elif low is not None:
                rng = f"{'>' if low_open else '>='} {low:g}"
            else:
                rng = f"{'<' if high_open else '<='} {high:g}"
            raise ConfigError(f"{self.key(key)} must be {rng}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{self.key(key)} must be True or False, got {value!r}")
        return bool(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(key, default)
        if value not in choices:
            raise unknown(key.replace("_", " "), self.key(key), value, choices)
        return value

    def warmup(
        self, key: str = "warmup_steps", default: Any = 0, *, limit: int | None = None
    ) -> int:
        steps = self.length(key, default)
        limit = self.total if limit is None else limit
        if steps > limit:
            raise ConfigError(
                f"{self.key(key)} = {steps} is longer than training (total_steps = {self.total})"
            )
        return steps


def _positive_peak(value: Any, key: str) -> float:
    if value is None:
        raise ConfigError(f"missing key {key}: the peak learning rate, a positive number")
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _check_total(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        if isinstance(total_steps, float) and total_steps.is_integer():
            total_steps = int(total_steps)
        else:
            raise ConfigError(f"total_steps must be a positive int, got {total_steps!r}")
    if total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps!r}")
    return int(total_steps)


# ----------------------------------------------------------------------------------------------
# Building blocks.


def _join(pieces: list[tuple[int, optax.Schedule]]) -> optax.Schedule:
    """Joins ``(length, schedule)`` pieces, skipping empty ones; the last runs on forever."""
    pieces = [(n, s) for n, s in pieces[:-1] if n > 0] + [pieces[-1]]
    if len(pieces) == 1:
        return pieces[0][1]
    boundaries = np.cumsum([n for n, _ in pieces[:-1]]).tolist()
    return optax.join_schedules([s for _, s in pieces], [int(b) for b in boundaries])


def _warmup(init_value: float, peak: float, steps: int) -> optax.Schedule:
    return optax.linear_schedule(init_value=init_value, end_value=peak, transition_steps=steps)


def _cosine(peak: float, steps: int, end_value: float, exponent: float) -> optax.Schedule:
    if steps <= 0:
        return optax.constant_schedule(end_value)
    return optax.cosine_decay_schedule(
        init_value=peak, decay_steps=steps, alpha=end_value / peak, exponent=exponent
    )


def _linear_decay(peak: float, steps: int, end_value: float) -> optax.Schedule:
    if steps <= 0:
        return optax.constant_schedule(end_value)
    return optax.linear_schedule(init_value=peak, end_value=end_value, transition_steps=steps)


def _sqrt_decay(peak: float, steps: int, end_value: float) -> optax.Schedule:
    if steps <= 0:
        return optax.constant_schedule(end_value)

    def schedule(count):
        t = jnp.clip(count, 0, steps) / steps
        return end_value + (peak - end_value) * (1.0 - jnp.sqrt(t))

    return schedule


# ----------------------------------------------------------------------------------------------
# The schedules, one builder each: (reader, peak) -> optax.Schedule.


def _constant(r: _Reader, peak: float) -> optax.Schedule:
    return optax.constant_schedule(peak)


def _linear_warmup(r: _Reader, peak: float) -> optax.Schedule:
    warmup = r.warmup(default=_REQUIRED)
    init_value = r.number("init_value", 0.0, low=0.0)
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.warmup_constant_schedule(
        init_value=init_value, peak_value=peak, warmup_steps=warmup
    )


def _cosine_schedule(r: _Reader, peak: float) -> optax.Schedule:
    decay = r.length("decay_steps", r.total)
    if decay < 1:
        raise ConfigError(f"{r.key('decay_steps')} must be at least 1 step, got {decay}")
    if r.has("alpha") and r.has("end_value"):
        raise ConfigError(
            f"{r.key('alpha')} and {r.key('end_value')} both given: set one "
            "(end_value = alpha * learning_rate)"
        )
    if r.has("alpha"):
        alpha = r.number("alpha", low=0.0)
    else:
        alpha = r.number("end_value", 0.0, low=0.0) / peak
    exponent = r.number("exponent", 1.0, low=0.0, low_open=True)
    return optax.cosine_decay_schedule(
        init_value=peak, decay_steps=decay, alpha=alpha, exponent=exponent
    )


def _warmup_cosine(r: _Reader, peak: float) -> optax.Schedule:
    warmup = r.warmup()
    # As optax's decay_steps: the warmup included; end_value from there on.
    decay = r.length("decay_steps", r.total)
    # decay == warmup == total warms up over the whole run (the drop to end_value would come
    # after the last step); decay == warmup before that drops without reaching the peak.
    if decay < 1 or (warmup and (decay < warmup or decay == warmup < r.total)):
        raise ConfigError(
            f"{r.key('decay_steps')} ({decay}) is the length of warmup and decay together (as "
            f"in optax): it must be more than {r.key('warmup_steps')} ({warmup}), or the warmup "
            "would end at end_value without reaching the peak (optax refuses it too; for a "
            "warmup alone, name='linear_warmup')"
        )
    end_value = r.number("end_value", 0.0, low=0.0)
    init_value = r.number("init_value", 0.0, low=0.0)
    exponent = r.number("exponent", 1.0, low=0.0, low_open=True)
    if warmup == 0:
        return _cosine(peak, decay, end_value, exponent)
    if warmup == decay:  # == total: all of training is warmup (optax would refuse the decay)
        return _join(
            [(warmup, _warmup(init_value, peak, warmup)), (0, optax.constant_schedule(end_value))]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=init_value,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=decay,
        end_value=end_value,
        exponent=exponent,
    )


def _warmup_linear(r: _Reader, peak: float) -> optax.Schedule:
    warmup = r.warmup()
    end_value = r.number("end_value", 0.0, low=0.0)
    init_value = r.number("init_value", 0.0, low=0.0)
    return _join(
        [
            (warmup, _warmup(init_value, peak, warmup)),
            (r.total - warmup, _linear_decay(peak, r.total - warmup, end_value)),
        ]
    )


def _exponential(r: _Reader, peak: float) -> optax.Schedule:
    transition = r.length("transition_steps")
    if transition < 1:
        raise ConfigError(f"{r.key('transition_steps')} must be at least 1 step, got {transition}")
    decay_rate = r.number("decay_rate", low=0.0, low_open=True)
    return optax.exponential_decay(
        init_value=peak,
        transition_steps=transition,
        decay_rate=decay_rate,
        transition_begin=r.length("transition_begin", 0),
        staircase=r.boolean("staircase", False),
        end_value=r.number("end_value", None, low=0.0),
    )


def _boundary(key: Any, where: str, total: int) -> int:
    """A piecewise boundary: an int step, or a str holding one; floats are fractions."""
    value = key
    if isinstance(key, str):
        text = key.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(
                    f"{where} key {key!r} is not a step number (an int, or a fraction in (0, 1])"
                ) from None
    return _to_length(value, f"{where}[{key!r}]", total)


def _piecewise_constant(r: _Reader, peak: float) -> optax.Schedule:
    has_dict = r.has("boundaries_and_scales")
    has_lists = r.has("boundaries") or r.has("scales")
    if has_dict and has_lists:
        raise ConfigError(
            f"{r.key('boundaries_and_scales')} and {r.key('boundaries')}/scales both given: set one"
        )
    if has_dict:
        where = r.key("boundaries_and_scales")
        items = r.raw("boundaries_and_scales")
        if not isinstance(items, Mapping) and not hasattr(items, "items"):
            raise ConfigError(f"{where} must be a dict {{step: scale}}, got {items!r}")
        pairs = [(k, v, f"{where}[{k!r}]") for k, v in as_dict(items).items()]
    elif has_lists:
        boundaries, scales = r.raw("boundaries"), r.raw("scales")
        for key, value in (("boundaries", boundaries), ("scales", scales)):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"{r.key(key)} must be a list, got {value!r}")
        if len(boundaries) != len(scales):
            raise ConfigError(
                f"{r.key('boundaries')} has {len(boundaries)} entries but {r.key('scales')} has "
                f"{len(scales)}: give one scale per boundary"
            )
        where = r.key("boundaries")
        pairs = [
            (b, s, f"{r.key('scales')}[{i}]")
            for i, (b, s) in enumerate(zip(boundaries, scales, strict=True))
        ]
    else:
        raise ConfigError(
            f"missing key {r.key('boundaries_and_scales')}: piecewise_constant needs "
            "boundaries_and_scales={step: scale} (or boundaries=[...] and scales=[...])"
        )
    table: dict[int, float] = {}
    for key, scale, scale_where in pairs:
        step = _boundary(key, where, r.total)
        if not _is_number(scale) or not math.isfinite(float(scale)) or scale < 0:
            raise ConfigError(f"{scale_where} must be a non-negative number, got {scale!r}")
        if step in table:
            raise ConfigError(f"{where} has boundary step {step} twice")
        table[step] = float(scale)
    return optax.piecewise_constant_schedule(init_value=peak, boundaries_and_scales=table)


def _rsqrt(r: _Reader, peak: float) -> optax.Schedule:
    warmup = r.warmup()
    init_value = r.number("init_value", 0.0, low=0.0)
    if r.has("timescale"):
        timescale = r.number("timescale", low=0.0, low_open=True)
    elif warmup > 0:
        timescale = float(warmup)
    else:
        raise ConfigError(
            f"missing key {r.key('timescale')}: rsqrt needs warmup_steps > 0 or a timescale "
            "(lr = learning_rate / sqrt(1 + (step - warmup_steps) / timescale))"
        )

    def decay(count):
        return peak * jax.lax.rsqrt(1.0 + jnp.maximum(count, 0) / timescale)

    return _join([(warmup, _warmup(init_value, peak, warmup)), (0, decay)])


def _warmup_stable_decay(r: _Reader, peak: float) -> optax.Schedule:
    warmup = r.warmup()
    decay = r.length("decay_steps", 0.2)
    end_value = r.number("end_value", 0.0, low=0.0)
    init_value = r.number("init_value", 0.0, low=0.0)
    shape = r.choice("decay_shape", ("linear", "cosine", "sqrt"), "linear")
    if warmup + decay > r.total:
        raise ConfigError(
            f"{r.key('warmup_steps')} ({warmup}) + {r.key('decay_steps')} ({decay}) = "
            f"{warmup + decay} is longer than training (total_steps = {r.total})"
        )
    decay_fn = {"linear": _linear_decay, "cosine": _cosine_decay_wsd, "sqrt": _sqrt_decay}[shape]
    return _join(
        [
            (warmup, _warmup(init_value, peak, warmup)),
            (r.total - warmup - decay, optax.constant_schedule(peak)),
            (decay, decay_fn(peak, decay, end_value)),
        ]
    )


def _cosine_decay_wsd(peak: float, steps: int, end_value: float) -> optax.Schedule:
    return _cosine(peak, steps, end_value, 1.0)


def _one_cycle(r: _Reader, peak: float) -> optax.Schedule:
    return optax.cosine_onecycle_schedule(
        transition_steps=r.total,
        peak_value=peak,
        pct_start=r.number("pct_start", 0.3, low=0.0, low_open=True, high=1.0, high_open=True),
        div_factor=r.number("div_factor", 25.0, low=0.0, low_open=True),
        final_div_factor=r.number("final_div_factor", 1e4, low=0.0, low_open=True),
    )


def _cycle_lengths(r: _Reader) -> list[int]:
    mult = r.number("cycle_mult", 1.0, low=1.0)
    if r.has("num_cycles") and r.has("cycle_steps"):
        raise ConfigError(
            f"{r.key('num_cycles')} and {r.key('cycle_steps')} both given: set one "
            "(num_cycles splits total_steps; cycle_steps repeats until the end)"
        )
    if r.has("num_cycles"):
        n = r.raw("num_cycles")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"{r.key('num_cycles')} must be a positive int, got {n!r}")
        weights = np.cumsum([mult**i for i in range(int(n))])
        ends = [int(round(r.total * w / weights[-1])) for w in weights]
        lengths = np.diff([0] + ends).tolist()
        if min(lengths) < 1:
            raise ConfigError(
                f"{r.key('num_cycles')} = {n} leaves a cycle with no steps "
                f"(total_steps = {r.total})"
            )
        return [int(n) for n in lengths]
    if r.has("cycle_steps"):
        first = r.length("cycle_steps")
        if first < 1:
            raise ConfigError(f"{r.key('cycle_steps')} must be at least 1 step, got {first}")
        lengths, done = [], 0
        while done < r.total:
            lengths.append(max(1, int(round(first * mult ** len(lengths)))))
            done += lengths[-1]
        return lengths
    raise ConfigError(
        f"missing key {r.key('num_cycles')}: sgdr needs num_cycles (or cycle_steps, the length "
        "of one cycle)"
    )


def _sgdr(r: _Reader, peak: float) -> optax.Schedule:
    lengths = _cycle_lengths(r)
    warmup = r.warmup()
    if warmup >= min(lengths):
        raise ConfigError(
            f"{r.key('warmup_steps')} = {warmup} is not shorter than a cycle ({min(lengths)} steps)"
        )
    init_value = r.number("init_value", 0.0, low=0.0)
    end_value = r.number("end_value", 0.0, low=0.0)
    exponent = r.number("exponent", 1.0, low=0.0, low_open=True)
    if warmup > 0:
        return optax.sgdr_schedule(
            [
                dict(
                    init_value=init_value,
                    peak_value=peak,
                    warmup_steps=warmup,
                    decay_steps=n,
                    end_value=end_value,
                    exponent=exponent,
                )
                for n in lengths
            ]
        )
    # Without warmup, the same cycles as optax.sgdr_schedule, minus its zero-length warmups.
    return _join([(n, _cosine(peak, n, end_value, exponent)) for n in lengths])


def _join_schedule(r: _Reader, peak: float) -> optax.Schedule:
    phases = r.raw("phases")
    if isinstance(phases, (str, bytes, Mapping)) or not hasattr(phases, "__len__"):
        raise ConfigError(f"{r.key('phases')} must be a list of schedule dicts, got {phases!r}")
    if len(phases) == 0:
        raise ConfigError(f"{r.key('phases')} is empty: give at least one phase")
    phases = [_as_schedule_dict(p, f"{r.key('phases')}[{i}]") for i, p in enumerate(phases)]
    for i, phase in enumerate(phases):  # names and keys first: a typo beats a length complaint
        _check_name_and_keys(phase, f"{r.key('phases')}[{i}]", _PHASE_KEYS)
    lengths: list[int | None] = []
    raw_sum = 0.0
    for i, phase in enumerate(phases):
        where = f"{r.key('phases')}[{i}].steps"
        steps = phase.get("steps")
        if steps is None:
            lengths.append(None)
            continue
        n = _to_length(steps, where, r.total)
        if n < 1:
            raise ConfigError(f"{where} must be at least 1 step, got {steps!r}")
        raw_sum += float(steps) * r.total if isinstance(steps, float) and steps <= 1 else n
        lengths.append(n)
    missing = [i for i, n in enumerate(lengths) if n is None]
    if len(missing) > 1:
        raise ConfigError(
            f"{r.key('phases')}[{missing[1]}].steps missing: only one phase may leave out steps "
            "(it takes the rest of training)"
        )
    given = sum(n for n in lengths if n is not None)
    if missing:
        rest = r.total - given
        if rest < 1:
            raise ConfigError(
                f"{r.key('phases')}: the phases with steps already take {given} steps, leaving "
                f"none for phases[{missing[0]}] (total_steps = {r.total})"
            )
        lengths[missing[0]] = rest
    elif given != r.total:
        if abs(raw_sum - r.total) <= 1e-6 * r.total and abs(given - r.total) < len(lengths):
            lengths[-1] += r.total - given  # fractions adding to 1, off by rounding only
        else:
            raise ConfigError(
                f"{r.key('phases')}: phase steps add up to {given} but total_steps is {r.total}; "
                "make them add up, or leave out one phase's steps to take the rest"
            )
    pieces = []
    for i, (phase, n) in enumerate(zip(phases, lengths, strict=True)):
        where = f"{r.key('phases')}[{i}]"
        phase_peak = peak
        if phase.get("learning_rate") is not None:
            phase_peak = _positive_peak(phase["learning_rate"], f"{where}.learning_rate")
        body = {k: v for k, v in phase.items() if k not in _PHASE_KEYS}
        pieces.append((n, _build(body, phase_peak, n, where, extra_keys=_PHASE_KEYS)))
    return optax.join_schedules(
        [s for _, s in pieces], [int(b) for b in np.cumsum([n for n, _ in pieces[:-1]])]
    )


_BUILDERS: dict[str, Callable[[_Reader, float], optax.Schedule]] = {
    "constant": _constant,
    "linear_warmup": _linear_warmup,
    "cosine": _cosine_schedule,
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "exponential": _exponential,
    "piecewise_constant": _piecewise_constant,
    "rsqrt": _rsqrt,
    "warmup_stable_decay": _warmup_stable_decay,
    "one_cycle": _one_cycle,
    "sgdr": _sgdr,
    "join": _join_schedule,
}
assert set(_BUILDERS) == set(_KEYS)


def _as_schedule_dict(config: Any, where: str) -> dict[str, Any]:
    if isinstance(config, str):
        return {"name": config}
    if not isinstance(config, Mapping) and not hasattr(config, "to_dict"):
        raise ConfigError(
            f"{where} must be a dict with a name (or a schedule name), got {config!r}"
        )
    return as_dict(config)


def _build(
    config: dict[str, Any],
    peak: float,
    total: int,
    where: str,
    extra_keys: tuple[str, ...] = (),
) -> optax.Schedule:
    name = _check_name_and_keys(config, where, extra_keys)
    return _BUILDERS[name](_Reader(config, where, total), peak)


def _check_name_and_keys(config: dict[str, Any], where: str, extra_keys: tuple[str, ...]) -> str:
    """Checks the schedule name and keys of ``config``; returns the canonical name."""
    name = config.get("name")
    if name is None:
        raise ConfigError(f"missing key {where}.name: one of {', '.join(NAMES)}")
    if not isinstance(name, str) or name not in NAMES:
        raise unknown("schedule", f"{where}.name", name, NAMES)
    name = ALIASES.get(name, name)
    valid = ("name",) + _KEYS[name] + extra_keys
    check_option_keys(config, valid, where, "schedule", name, _KEYS)
    return name


# ----------------------------------------------------------------------------------------------
# Public API.


def create(optimizer_config: Any, *, total_steps: int, where: str = "optimizer") -> optax.Schedule:
    """Builds the learning-rate schedule of an optimizer config.

    Args:
      optimizer_config: ConfigDict, FrozenConfigDict or dict with ``learning_rate`` (the peak, a
        positive number) and optionally ``schedule`` (a dict with ``name`` and that schedule's
        keys, a schedule name, or ``None`` for constant). Other keys are ignored here.
      total_steps: the number of optimizer steps of training (``num_train_steps //
        accumulate_steps``); fractions and the ends of decays refer to it.
      where: the config path used in error messages.

    Returns:
      An ``optax.Schedule``: optimizer step (int, traced or not) -> absolute learning rate.

    Raises:
      ConfigError: an unknown schedule or key (with the nearest valid choices), a missing or
        non-positive learning rate, a bad length, a warmup longer than training, phases that do
        not add up, or ``total_steps < 1``.
    """
    config = as_dict(optimizer_config)
    total = _check_total(total_steps)
    peak = _positive_peak(config.get("learning_rate"), f"{where}.learning_rate")
    schedule = config.get("schedule")
    if schedule is None:
        return optax.constant_schedule(peak)
    schedule = _as_schedule_dict(schedule, f"{where}.schedule")
    return _build(schedule, peak, total, f"{where}.schedule")


def curve(optimizer_config: Any, *, total_steps: int) -> np.ndarray:
    """The learning rate at every step ``0 .. total_steps - 1`` as a float32 numpy array.

    Evaluated in one jitted, vectorised call (a million steps take well under a second); its
    memory grows with ``total_steps``: plots use :func:`sampled_curve`.
    """
    return sampled_curve(optimizer_config, total_steps=total_steps, points=int(total_steps))[1]


# Points of the sampled curve behind the plots: plenty for a 1000-pixel-wide PNG.
PLOT_POINTS = 20_001


def sampled_curve(
    optimizer_config: Any, *, total_steps: int, points: int = PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, learning rates)`` at at most ``points`` evenly spaced steps of ``0 ..
    total_steps - 1`` (every step when there are no more than ``points``; always the first and
    the last): memory and time bounded by ``points``, whatever the number of steps."""
    total_steps, points = int(total_steps), max(2, int(points))
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    schedule = create(optimizer_config, total_steps=total_steps)
    if total_steps <= points:
        steps = np.arange(total_steps, dtype=np.int64)
    else:
        steps = np.unique(np.round(np.linspace(0, total_steps - 1, points)).astype(np.int64))
    values = jax.jit(jax.vmap(lambda s: jnp.asarray(schedule(s), jnp.float32)))(
        jnp.asarray(steps, jnp.int32)
    )
    return steps, np.asarray(values, dtype=np.float32)


def _schedule_name(optimizer_config: Any) -> str:
    schedule = as_dict(optimizer_config).get("schedule")
    if schedule is None:
        return "constant"
    if isinstance(schedule, str):
        return schedule
    return str(as_dict(schedule).get("name"))


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def text_plot(optimizer_config: Any, *, total_steps: int, width: int = 60, height: int = 12) -> str:
    """An ASCII chart of the learning-rate curve, with its peak, final value and step range.

    Each of the ``width`` columns shows the learning rate at one evenly spaced step (the first
    column is step 0, the last is ``total_steps - 1``); the y axis runs from 0 to the peak.
    """
    if width < 2 or height < 2:
        raise ValueError(f"text_plot needs width >= 2 and height >= 2, got {width}x{height}")
    all_steps, values = sampled_curve(optimizer_config, total_steps=total_steps)
    n = int(total_steps)
    cols = min(width, len(values))
    steps = np.unique(np.round(np.linspace(0, len(values) - 1, cols)).astype(np.int64))
    sampled = values[steps].astype(np.float64)
    steps = all_steps[steps]
    top = float(values.max())
    scale = top if top > 0 else 1.0
    rows = np.clip(np.round(sampled / scale * (height - 1)), 0, height - 1).astype(int)
    grid = [[" "] * len(steps) for _ in range(height)]
    for c, row in enumerate(rows):
        lo, hi = row, row
        if c > 0:  # connect steep changes with a vertical line
            lo, hi = min(row, rows[c - 1] + 1), max(row, rows[c - 1] - 1)
        for k in range(lo, hi + 1):
            grid[k][c] = "*" if k == row else ":"
    peak_step = int(all_steps[np.argmax(values)])
    labels = {height - 1: _fmt(top), 0: "0"}
    pad = max(len(s) for s in labels.values())
    lines = [
        f"learning rate ({_schedule_name(optimizer_config)}), {n} steps: "
        f"peak {_fmt(top)} at step {peak_step}, final {_fmt(float(values[-1]))} at step {n - 1}"
    ]
    for k in range(height - 1, -1, -1):
        lines.append(f"{labels.get(k, ''):>{pad}} |{''.join(grid[k])}")
    lines.append(" " * pad + " +" + "-" * len(steps))
    first, last = "0", str(n - 1)
    gap = max(1, len(steps) - len(first) - len(last))
    ticks = first if n == 1 else first + " " * gap + last
    lines.append(" " * (pad + 2) + ticks + "  (step)")
    return "\n".join(lines)


def save_plot(optimizer_config: Any, *, total_steps: int, path: str | os.PathLike) -> str:
    """Saves the learning-rate curve as a PNG (matplotlib, Agg; no display needed).

    Returns the path written, as a string. Parent directories are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, values = sampled_curve(optimizer_config, total_steps=total_steps)
    lr = as_dict(optimizer_config).get("learning_rate")

    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, values, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{_schedule_name(optimizer_config)}: peak {lr:g}, {int(total_steps)} steps")
    ax.set_xlim(0, max(1, int(total_steps) - 1))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)
