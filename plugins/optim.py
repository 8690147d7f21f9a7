"""Optax optimizers from one config.

``create(optimizer_config, *, total_steps)`` returns one ``optax.GradientTransformation`` built from
an ``ml_collections`` config (or a plain dict)::

    optimizer = dict(
        name='adamw',              # any optax or optax.contrib optimizer ('muon', 'prodigy', ...)
        learning_rate=1e-3,        # peak learning rate (required, > 0)
        kwargs=dict(b2=0.95),      # further keyword args of that optax function (checked)
        schedule=dict(name='warmup_cosine', warmup_steps=100, end_value=1e-5),
        weight_decay=None,         # None: the optimizer's own default; a number: lr * wd * param
        weight_decay_mask='matrices',   # 'all' | 'matrices' (ndim >= 2) | list of path regexes
        clip_global_norm=None,     # clip gradients by their global norm first
        clip_value=None,           # clip every gradient element to [-v, v] first
        accumulate_steps=1,        # optax.MultiSteps when > 1; schedules count optimizer steps
        ema_decay=None,            # EMA of the parameters from the initial ones (see ema_params)
        skip_nonfinite=False,      # skip updates whose gradients hold NaN/Inf, and count them
        freeze=[],                 # path regexes of parameters that never change (no state)
        param_groups=[],           # dict(match=..., lr_mult=..., weight_decay=..., optimizer=...)
    )

The chain it builds, outermost first::

    freeze partition -> apply_if_finite -> MultiSteps -> chain(clip_value, clip_global_norm,
        [param_groups partition of] optimizer (+ decoupled weight decay), record LR, EMA)

Each wrapper is only present when its key asks for it, so ``name='adamw'`` with a schedule *is*
``optax.adamw(schedule)`` plus a tiny state that records the learning rate for logging.

``weight_decay`` means one thing for every optimizer: AdamW's decoupled decay, ``-lr(step) *
weight_decay * param`` on the parameters ``weight_decay_mask`` selects. It goes to the
optimizer's own argument where optax's is that (adamw, lion, adan, sophia, muon, ...); where
optax's own argument has another scale (``adafactor``'s ``weight_decay_rate`` is not multiplied by
the learning rate; ``lamb``, ``lars``: scaled by the trust ratio; ``adadelta``, ``novograd``:
rescaled or accumulated with the gradient) it is added after the optimizer instead, and the
optimizer's own argument, with optax's meaning, is ``kwargs=dict(weight_decay=...)``
(``weight_decay_rate`` for adafactor). Optimizers that estimate their own step size (prodigy,
dadapt_adamw, dog, dowg, cocob, momo, mechanize) decay inside it, at the step size they use.
``madgrad``, ``polyak_sgd`` and the wrappers ``schedule_free``/``sam`` refuse ``weight_decay``
and say what to write instead.

``name='muon'`` means Muon (``optax.contrib.muon``) for rank-2 weights that are not embeddings and
AdamW for everything else (biases, norms, embeddings, conv kernels); ``kwargs`` prefixed ``adam_``
(``adam_b1``, ``adam_b2``, ``adam_eps_root``, ``adam_learning_rate``, ``adam_weight_decay``) go to
the AdamW part. ``weight_decay`` decays the parameters ``weight_decay_mask`` selects in both
parts; ``kwargs.adam_weight_decay`` (as in optax) decays every parameter of the AdamW part.
``name='polyak_sgd'`` takes ``learning_rate`` as its ``max_learning_rate`` (a fixed cap on the
Polyak step size, no schedule) and needs ``value=`` (the loss) at update.

Optimizers that need more than gradients at update time say so: ``extra_update_args(config)``
names the arguments (``value`` for momo, ``obj_fn`` for sophia, ``value``/``grad``/``value_fn``
for lbfgs) and the optimizer raises a clear error when they are missing. Wrappers take their
inner optimizers as sub-configs: ``kwargs=dict(base_optimizer=dict(name='adam'))`` for
``schedule_free``/``mechanize``/``galore``, ``kwargs=dict(optimizer=dict(...),
adv_optimizer=dict(...))`` for ``sam``; a sub-config without ``learning_rate`` inherits the
parent's learning rate and schedule.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from plugins import masks, schedules
from plugins.config_errors import ConfigError, as_dict, check_keys, unknown

PyTree = Any

TOP_KEYS = (
    "name",
    "learning_rate",
    "kwargs",
    "schedule",
    "weight_decay",
    "weight_decay_mask",
    "clip_global_norm",
    "clip_value",
    "accumulate_steps",
    "ema_decay",
    "skip_nonfinite",
    "freeze",
    "param_groups",
)
SUB_KEYS = ("name", "learning_rate", "kwargs", "schedule", "weight_decay", "weight_decay_mask")
GROUP_KEYS = ("name", "match", "lr_mult", "weight_decay", "weight_decay_mask", "optimizer")

# Functions with an optimizer-like signature that are not optimizers.
_NOT_OPTIMIZERS = {"selective_transform"}
# Wrappers: their keyword args that are whole optimizers, given as sub-configs.
_SUB_OPTIMIZER_ARGS = ("base_optimizer", "optimizer", "adv_optimizer")
# Extra arguments of ``update`` some optimizers need beyond (updates, state, params).
_EXTRA_ARGS = {
    "polyak_sgd": ("value",),
    "momo": ("value",),
    "momo_adam": ("value",),
    "sophia": ("obj_fn",),
    "lbfgs": ("value", "grad", "value_fn"),
}
# Optimizers whose learning rate must be a number, not a schedule (-> one that takes schedules).
_FIXED_LR = {
    "rprop": None,
    "sm3": None,
    "optimistic_adam": "optimistic_adam_v2",
    "polyak_sgd": None,
}
# Optimizers whose peak learning rate argument has another name: polyak_sgd estimates its step
# size from the loss (``value=``) and ``optimizer.learning_rate`` caps it.
_LR_ARG = {"polyak_sgd": "max_learning_rate"}
# Optimizers with a ``warmup_steps`` argument of their own, which needs a fixed learning rate.
_OWN_WARMUP = ("schedule_free_adamw", "schedule_free_sgd")
# Kwargs of optax.contrib.muon that configure its AdamW half; we route them to our AdamW part.
_MUON_ADAM_KWARGS = {
    "adam_b1": "b1",
    "adam_b2": "b2",
    "adam_eps_root": "eps_root",
    "adam_weight_decay": "weight_decay",
}
# Other names users write for an optimizer's kwargs (seed documents; older optax versions).
_KWARG_ALIASES = {"muon": {"momentum": "beta"}, "noisy_sgd": {"seed": "key"}}
# Kwargs optax warns about when left unset, set here to the value optax falls back to.
_KWARG_DEFAULTS = {"noisy_sgd": {"key": 0}}
# Optimizers that estimate their own step size (the learning rate only scales it) and decay the
# weights inside it, to every parameter: decay outside them, as for a mask, would be at the
# learning rate's scale, far too strong. (dog, dowg and cocob estimate theirs too; they take a
# mask, so ``weight_decay`` goes to their own argument, masked.)
_OWN_STEP_SIZE = ("dadapt_adamw", "mechanize", "momo", "momo_adam", "prodigy")
# Optimizers whose own weight-decay argument is not AdamW's ``lr * wd * param``: how optax
# applies it. ``optimizer.weight_decay`` is AdamW's decay for them too (added after the optimizer,
# masked); their own argument, with optax's meaning, is ``optimizer.kwargs.<that name>``.
_OTHER_SCALE_DECAY = {
    "adafactor": ("weight_decay_rate", "is not multiplied by the learning rate"),
    "adadelta": ("weight_decay", "is added to the gradient before adadelta rescales it"),
    "lamb": ("weight_decay", "is scaled by the trust ratio"),
    "lars": ("weight_decay", "is scaled by the trust ratio, then accumulated by momentum"),
    "novograd": (
        "weight_decay",
        "is added to the normalised gradient, then accumulated by momentum",
    ),
    "madgrad": ("weight_decay", "is L2 added to the gradient"),
}
# Optimizers that compute their update from state anchored at earlier parameters (madgrad's dual
# averaging from the initial ones): decay added after them is pulled back, so they take none.
_NO_DECOUPLED_DECAY = ("madgrad",)
# Optimizers whose own weight decay is AdamW's but takes no mask: with a mask they are built as
# optax builds them, with the decay masked.
_SCHEDULE_FREE = ("schedule_free_adamw", "schedule_free_sgd")
# Wrappers whose inner transformation scales gradients and must not apply a learning rate.
_SCALING_ONLY_ARGS = {"galore": "base_optimizer"}
_MAX_CONSECUTIVE_NONFINITE = 2**31 - 1  # skip forever; the count is what gets reported


def _discover_optimizers() -> dict[str, Callable[..., optax.GradientTransformation]]:
    """Every optax and optax.contrib function that builds an optimizer, by name."""
    found: dict[str, Callable[..., optax.GradientTransformation]] = {}
    for module in (optax, optax.contrib):
        for name in dir(module):
            fn = getattr(module, name)
            if name.startswith(("_", "scale_by")) or name in _NOT_OPTIMIZERS:
                continue
            if isinstance(fn, functools.partial):  # nadam, nadamw: partials of adam(w)
                if not inspect.isfunction(fn.func):
                    continue
            elif not inspect.isfunction(fn):
                continue
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            if "learning_rate" in params or any(a in params for a in _SUB_OPTIMIZER_ARGS):
                found.setdefault(name, fn)
    found["muon"] = optax.contrib.muon
    found["polyak_sgd"] = optax.polyak_sgd  # its peak learning rate is max_learning_rate
    return found


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = _discover_optimizers()


# ----------------------------------------------------------------------------- state pieces


class LearningRateState(NamedTuple):
    """State of :func:`record_learning_rate`: optimizer steps taken and the last LR used."""

    count: jax.Array
    learning_rate: jax.Array


def record_learning_rate(schedule: optax.Schedule) -> optax.GradientTransformation:
    """Leaves updates unchanged and records ``schedule(count)`` so it can be logged."""

    def init(params: PyTree) -> LearningRateState:
        del params
        return LearningRateState(jnp.zeros([], jnp.int32), jnp.asarray(schedule(0), jnp.float32))

    def update(updates, state, params=None):
        del params
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        return updates, LearningRateState(optax.safe_increment(state.count), lr)

    return optax.GradientTransformation(init, update)


class EmaParamsState(NamedTuple):
    """State of :func:`ema_params`: the exponential moving average of the parameters."""

    ema: PyTree


def ema_params(decay: float) -> optax.GradientTransformation:
    """Keeps ``ema = decay * ema + (1 - decay) * new_params``, starting at the initial params.

    This is ``optax.ema(decay, debias=False)`` applied to the parameters after each step, with
    the average started at the initial parameters, not at zero: no bias correction is needed or
    applied (optax's default ``ema(decay)`` starts at zero and divides by ``1 - decay**t``).
    Early in training the EMA therefore leans towards the initial parameters: after ``t`` steps
    they still weigh ``decay**t``.

    Place it last in a chain: it sees the final updates and leaves them unchanged.
    """

    def init(params: PyTree) -> EmaParamsState:
        return EmaParamsState(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_decay needs the params: call update(grads, state, params)")
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema, new_params
        )
        return updates, EmaParamsState(ema)

    return optax.GradientTransformation(init, update)


class DecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: steps taken, for the learning-rate schedule."""

    count: jax.Array


def decoupled_weight_decay(
    weight_decay: float, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Adds ``-learning_rate(step) * weight_decay * param`` to the updates (AdamW-style decay for
    optimizers that have no weight-decay argument). Mask it with ``optax.masked``."""

    def init(params: PyTree) -> DecayState:
        del params
        return DecayState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight_decay needs the params: call update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(lambda u, p: u - lr * weight_decay * p, updates, params)
        return updates, DecayState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def require_extra_args(
    tx: optax.GradientTransformation, names: tuple[str, ...], optimizer_name: str
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that calling ``update`` without the keyword args ``names`` raises one clear
    error (at trace time, so it costs nothing per step)."""
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, **extra_args):
        missing = [n for n in names if n not in extra_args]
        if missing:
            wanted = ", ".join(f"{n}=..." for n in names)
            raise TypeError(
                f"optimizer {optimizer_name!r} needs more than gradients: call "
                f"update(grads, state, params, {wanted}); missing {', '.join(missing)}"
            )
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)


# ----------------------------------------------------------------------------- config checks


@dataclasses.dataclass(frozen=True)
class Group:
    """One parameter group: which parameters, and what they get."""

    label: str
    match: masks.Patterns | None  # which parameters; None: the default group (everything else)
    lr_mult: float
    config: dict[str, Any]  # a SUB_KEYS optimizer config


def _number(cfg: Mapping[str, Any], key: str, where: str, *, positive: bool, allow_none: bool):
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{where}.{key} must be a number (an int or float), got {value!r} "
            f"(a {type(value).__name__})"
        )
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key} must be > 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"{where}.{key} must be >= 0, got {value!r}")
    return float(value)


def _patterns(value: Any, where: str) -> masks.Patterns:
    """A checked selection: a list of regexes, or a predicate, bool tree or mask function."""
    if value is None:
        return []
    if callable(value) or masks.is_mask_tree(value):
        return value
    if isinstance(value, str):
        value = _sequence_literal(value)
    if isinstance(value, Mapping) or not isinstance(value, list | tuple):
        raise ConfigError(
            f"{where} must be a regex, a list of regexes, a predicate (path, leaf) -> bool, "
            f"a tree of bools or a function params -> tree of bools; got {value!r}"
        )
    value = list(value)
    masks.compile_patterns(value, where)
    return value


def _sequence_literal(text: str) -> list[Any]:
    """``"('kernel$', 'bias')"`` -> ``['kernel$', 'bias']``: a tuple or list written as a string,
    as ``--config.optimizer.weight_decay_mask="('kernel$',)"`` arrives when the config file's
    value is a string (ml_collections parses an override by the type of the value it replaces).
    Any other string is one regex."""
    stripped = text.strip()
    if stripped and stripped[0] in "([" and stripped[-1] in ")]":
        try:
            value = ast.literal_eval(stripped)
        except (SyntaxError, ValueError):
            return [text]
        if isinstance(value, list | tuple):
            return list(value)
    return [text]


def _given(selection: masks.Patterns) -> bool:
    """Whether a checked selection selects anything at all (``[]``: nothing)."""
    return not (isinstance(selection, list) and not selection)


def _selects(mask: Any) -> bool:
    """Whether a checked weight-decay mask is a selection (not ``'all'``/``'matrices'``)."""
    return not (masks.is_named(mask, "all") or masks.is_named(mask, "matrices"))


def _check_sub(cfg: dict[str, Any], where: str, parent: dict[str, Any] | None) -> dict[str, Any]:
    """Validates a SUB_KEYS optimizer config; fills learning rate/schedule from ``parent``."""
    check_keys(cfg, SUB_KEYS if parent is not None else TOP_KEYS, where)
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ConfigError(f"{where}.name is required (e.g. 'adamw')")
    name = cfg["name"]
    if isinstance(name, str) and name not in OPTIMIZERS:
        modules = {"optax": optax, "optax.contrib": optax.contrib}
        module = next((m for m, mod in modules.items() if hasattr(mod, name)), None)
        if module is not None:
            raise ConfigError(
                f"{where}.name: {module}.{name} is a transform or wrapper, not an optimizer that "
                "takes a learning rate; combine it with the transformation create() returns "
                f"where its documentation says (optax.chain(..., optim.create(...), ...) for a "
                f"transform, {module}.{name}(optim.create(...), ...) for a wrapper)"
            )
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise unknown("optimizer", f"{where}.name", name, OPTIMIZERS)
    if parent is not None and "learning_rate" not in cfg:
        cfg["learning_rate"] = parent["learning_rate"]
        cfg.setdefault("schedule", parent.get("schedule"))
    if "learning_rate" not in cfg:
        raise ConfigError(f"{where}.learning_rate is required (the peak learning rate)")
    if callable(cfg["learning_rate"]):
        raise ConfigError(
            f"{where}.learning_rate must be a number (the peak learning rate), got a function "
            f"(an optax schedule?): describe its shape with {where}.schedule instead, e.g. "
            "dict(name='warmup_cosine', warmup_steps=100, decay_steps=1000, end_value=1e-5); "
            "plugins.schedules lists the schedules"
        )
    _number(cfg, "learning_rate", where, positive=True, allow_none=False)
    cfg["kwargs"] = as_dict(cfg.get("kwargs"))
    cfg["weight_decay"] = _number(cfg, "weight_decay", where, positive=False, allow_none=True)
    mask = cfg.get("weight_decay_mask", "matrices")
    if _selects(mask):
        mask = _patterns(mask, f"{where}.weight_decay_mask")
    cfg["weight_decay_mask"] = mask
    if name in _OWN_STEP_SIZE and cfg["weight_decay"] and not masks.is_named(mask, "all"):
        raise ConfigError(
            f"{where}.weight_decay_mask: {name!r} decays every parameter itself, inside the step "
            f"size it estimates, and takes no mask; set {where}.weight_decay_mask='all'"
        )
    _check_decay_fits(cfg, where)
    _check_kwargs(cfg, where)
    _check_schedule_fits(cfg, where)
    return cfg


def _check_decay_fits(cfg: dict[str, Any], where: str) -> None:
    """Refuses ``weight_decay`` where AdamW's decoupled decay cannot be added (it would be undone
    or have another scale), saying what to write instead."""
    name, wd = cfg["name"], cfg["weight_decay"]
    if not wd:
        return
    if name in _NO_DECOUPLED_DECAY:
        arg, how = _OTHER_SCALE_DECAY[name]
        raise ConfigError(
            f"{where}.weight_decay: {name!r} steps from its initial parameters (dual averaging), "
            f"so AdamW-style decay added after it would be undone; its own {arg} {how}: set "
            f"{where}.kwargs.{arg}={wd!r} with {where}.weight_decay_mask='all' for that, or "
            f"leave {where}.weight_decay unset"
        )
    if name == "polyak_sgd":
        raise ConfigError(
            f"{where}.weight_decay: 'polyak_sgd' chooses its own step size from the loss "
            f"({where}.learning_rate only caps it) and has no weight decay of its own, so decay "
            f"at the cap would not follow its steps; leave {where}.weight_decay unset"
        )
    params = inspect.signature(OPTIMIZERS[name]).parameters
    wrapped = [k for k in _SUB_OPTIMIZER_ARGS if k in params and k != "adv_optimizer"]
    if wrapped and "weight_decay" not in params:
        raise ConfigError(
            f"{where}.weight_decay: {name!r} wraps another optimizer, whose steps it rearranges; "
            f"give the decay to that one: {where}.kwargs.{wrapped[0]}.weight_decay={wd!r}"
        )


def _constant_schedule(cfg: Mapping[str, Any]) -> bool:
    schedule = cfg.get("schedule")
    if schedule is None or (isinstance(schedule, str) and schedule == "constant"):
        return True
    return isinstance(schedule, Mapping) and schedule.get("name") == "constant"


def _check_schedule_fits(cfg: dict[str, Any], where: str) -> None:
    """Optimizers that take a fixed learning rate get no schedule; schedule-free's own
    ``warmup_steps`` becomes the schedule (a linear warmup from 0, as optax builds it), so the
    logged learning rate is the one used."""
    name = cfg["name"]
    if name in _FIXED_LR and not _constant_schedule(cfg):
        alternative = _FIXED_LR[name]
        instead = f" (or use {alternative!r}, which does)" if alternative else ""
        raise ConfigError(
            f"optimizer {name!r} takes a fixed learning rate, not a schedule: "
            f"remove {where}.schedule{instead}"
        )
    warmup = cfg["kwargs"].get("warmup_steps") if name in _OWN_WARMUP else None
    if warmup is not None:
        if not _constant_schedule(cfg):
            raise ConfigError(
                f"{where}.kwargs.warmup_steps and {where}.schedule both shape the learning "
                f"rate: give one of them (e.g. schedule=dict(name='linear_warmup', "
                f"warmup_steps={warmup!r}))"
            )
        del cfg["kwargs"]["warmup_steps"]
        cfg["schedule"] = {"name": "linear_warmup", "warmup_steps": warmup, "init_value": 0.0}


def _check_kwargs(cfg: dict[str, Any], where: str) -> None:
    name, kwargs = cfg["name"], cfg["kwargs"]
    for alias, key in _KWARG_ALIASES.get(name, {}).items():
        if alias in kwargs:
            if key in kwargs:
                raise ConfigError(
                    f"{where}.kwargs: {alias!r} is another name for {key!r}; give only {key!r}"
                )
            kwargs[key] = kwargs.pop(alias)
    params = inspect.signature(OPTIMIZERS[name]).parameters
    valid = set(params) - {"learning_rate"}
    if name == "muon":
        valid |= {"adam_learning_rate"}
    own_decay = _OTHER_SCALE_DECAY.get(name, ("",))[0]
    for key in kwargs:
        if key in ("learning_rate", "lr", _LR_ARG.get(name)):
            raise ConfigError(f"{where}.kwargs.{key}: set {where}.learning_rate instead")
        if key == own_decay:
            _check_own_decay(
                cfg, where, key, mask_arg="mask" in params or "weight_decay_mask" in params
            )
            continue
        if key in ("weight_decay", "weight_decay_rate"):
            raise ConfigError(
                f"{where}.kwargs.{key}: set {where}.weight_decay instead (decoupled, AdamW-style "
                "decay: lr * weight_decay * param)"
            )
        if key in ("mask", "weight_decay_mask") and key in params:
            raise ConfigError(f"{where}.kwargs.{key}: set {where}.weight_decay_mask instead")
        if key not in valid:
            raise unknown(f"argument of optax {name}()", f"{where}.kwargs.{key}", key, valid)
        if key in params:
            _check_kwarg_type(kwargs[key], params[key].default, f"{where}.kwargs.{key}", name)
    for key in _SUB_OPTIMIZER_ARGS:
        if isinstance(kwargs.get(key), Mapping) or hasattr(kwargs.get(key), "to_dict"):
            if _SCALING_ONLY_ARGS.get(name) == key:
                raise ConfigError(
                    f"{where}.kwargs.{key}: {name!r} takes a gradient scaling transformation "
                    f"without a learning rate (e.g. optax.scale_by_adam()), not an optimizer "
                    f"config; leave it out for {name}'s default"
                )
            kwargs[key] = _check_sub(as_dict(kwargs[key]), f"{where}.kwargs.{key}", cfg)
    required = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name != "learning_rate"
        and p.name not in kwargs
    ]
    if required:
        hint = (
            " (a sub-config such as dict(name='adam'))"
            if set(required) & set(_SUB_OPTIMIZER_ARGS)
            else ""
        )
        raise ConfigError(
            f"optimizer {name!r} needs {where}.kwargs.{required[0]}{hint}; "
            f"required: {', '.join(required)}"
        )


def _check_own_decay(cfg: dict[str, Any], where: str, key: str, *, mask_arg: bool) -> None:
    """``kwargs.<own weight decay>`` of an optimizer whose own decay is not AdamW's: optax's
    meaning, given alone, masked by ``weight_decay_mask`` where optax takes a mask."""
    name, value = cfg["name"], cfg["kwargs"][key]
    how = _OTHER_SCALE_DECAY[name][1]
    _number(cfg["kwargs"], key, f"{where}.kwargs", positive=False, allow_none=True)
    if not value:
        return
    if cfg["weight_decay"]:
        raise ConfigError(
            f"{where}.kwargs.{key} and {where}.weight_decay are two kinds of decay: give one, "
            f"{where}.weight_decay (AdamW's lr * weight_decay * param, added after {name}) or "
            f"{where}.kwargs.{key} (optax's own, which {how})"
        )
    if not mask_arg and not masks.is_named(cfg["weight_decay_mask"], "all"):
        raise ConfigError(
            f"{where}.kwargs.{key}: optax's {name} decays every parameter (it takes no mask); "
            f"set {where}.weight_decay_mask='all', or use {where}.weight_decay (AdamW-style, "
            "masked)"
        )


def _check_kwarg_type(value: Any, default: Any, key: str, name: str) -> None:
    """A kwarg whose optax default is a number (or a bool) must be one: a string or list there
    would fail deep inside JAX when the step is traced."""
    if default is inspect.Parameter.empty or default is None:
        return  # an argument without a typed default
    if callable(value) or hasattr(value, "dtype"):
        return  # a schedule or an array
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(
                f"{key} must be True or False (a bool, as optax {name}()'s default "
                f"{default!r}), got {value!r} (a {type(value).__name__})"
            )
    elif isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"{key} must be a number (as optax {name}()'s default {default!r}), "
                f"got {value!r} (a {type(value).__name__})"
            )


def check_config(optimizer_config: Any) -> dict[str, Any]:
    """Validates an optimizer config and returns it as a plain dict with defaults filled in.

    Raises ``ConfigError`` (a ``ValueError``) naming the first bad key and the valid choices.
    """
    where = "optimizer"
    cfg = _check_sub(as_dict(optimizer_config), where, parent=None)
    cfg["clip_global_norm"] = _number(
        cfg, "clip_global_norm", where, positive=True, allow_none=True
    )
    cfg["clip_value"] = _number(cfg, "clip_value", where, positive=True, allow_none=True)
    steps = cfg.get("accumulate_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{where}.accumulate_steps must be an int >= 1, got {steps!r}")
    cfg["accumulate_steps"] = steps
    ema = cfg.get("ema_decay")
    if ema is not None and (
        isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 < ema < 1
    ):
        raise ConfigError(
            f"{where}.ema_decay must be None or in (0, 1), got {ema!r}: the EMA of the "
            "parameters, ema = ema_decay * ema + (1 - ema_decay) * params after each step, "
            "started at the initial parameters without bias correction"
        )
    cfg["ema_decay"] = None if ema is None else float(ema)
    skip = cfg.get("skip_nonfinite", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}.skip_nonfinite must be True or False, got {skip!r}")
    cfg["skip_nonfinite"] = skip
    cfg["freeze"] = _patterns(cfg.get("freeze"), f"{where}.freeze")
    groups = cfg.get("param_groups") or []
    if isinstance(groups, Mapping) or not isinstance(groups, list | tuple):
        raise ConfigError(f"{where}.param_groups must be a list of dicts, got {groups!r}")
    cfg["param_groups"] = [
        _check_group(g, f"{where}.param_groups[{i}]", cfg) for i, g in enumerate(groups)
    ]
    return cfg


def _check_group(group: Any, where: str, parent: dict[str, Any]) -> dict[str, Any]:
    group = as_dict(group)
    check_keys(group, GROUP_KEYS, where)
    if "match" not in group:
        raise ConfigError(
            f"{where}.match is required: a path regex, a list of them, or a predicate"
        )
    group["match"] = _patterns(group["match"], f"{where}.match")
    group["lr_mult"] = _number(group, "lr_mult", where, positive=True, allow_none=True) or 1.0
    # A group without its own optimizer is the parent's optimizer with the group's changes; a
    # group with one gets only the parent's learning rate and schedule, not its weight decay
    # (``dict(match='bias', optimizer=dict(name='adam'))`` is plain adam, as in optax).
    sub = as_dict(group.get("optimizer"))
    inherit = not sub
    if inherit:
        sub = {"name": parent["name"], "kwargs": parent["kwargs"]}
    for key in ("weight_decay", "weight_decay_mask"):
        if key in group:
            sub[key] = group[key]
        elif inherit:
            sub[key] = parent[key]
    group["optimizer"] = _check_sub(sub, f"{where}.optimizer", parent)
    return group


def groups_of(cfg: dict[str, Any]) -> list[Group]:
    """The parameter groups of a checked config, the default group last."""
    default = {k: cfg[k] for k in SUB_KEYS if k in cfg}
    groups = [
        Group(
            label=str(g.get("name") or f"group{i}"),
            match=g["match"],
            lr_mult=g["lr_mult"],
            config=g["optimizer"],
        )
        for i, g in enumerate(cfg["param_groups"])
    ]
    return groups + [Group("default", None, 1.0, default)]


# ----------------------------------------------------------------------------- building


def _scaled(schedule: optax.Schedule, mult: float) -> optax.Schedule:
    return schedule if mult == 1.0 else (lambda step: mult * schedule(step))


def _mask_fn(spec: Any) -> Callable[[PyTree], PyTree] | None:
    return None if masks.is_named(spec, "all") else masks.decay_mask_fn(spec)


def build_optimizer(
    cfg: dict[str, Any], *, total_steps: int, lr_mult: float = 1.0
) -> optax.GradientTransformation:
    """Builds one optimizer (schedule, optax function, weight decay) from a checked sub-config.

    ``total_steps`` counts optimizer steps. No clipping, accumulation or EMA here: see create().
    """
    schedule = _scaled(schedules.create(cfg, total_steps=total_steps), lr_mult)
    name = cfg["name"]
    if name == "muon":
        return _muon(cfg, schedule, total_steps=total_steps, lr_mult=lr_mult)
    fn = OPTIMIZERS[name]
    params = inspect.signature(fn).parameters
    call = {**_KWARG_DEFAULTS.get(name, {}), **cfg["kwargs"]}
    for key in _SUB_OPTIMIZER_ARGS:
        if isinstance(call.get(key), dict):
            # A group's lr_mult scales the steps the wrapped optimizer takes, not the size of
            # sam's adversarial perturbation.
            mult = 1.0 if key == "adv_optimizer" else lr_mult
            call[key] = build_optimizer(call[key], total_steps=total_steps, lr_mult=mult)
    lr_arg = _LR_ARG.get(name, "learning_rate")
    if name in _FIXED_LR:
        call[lr_arg] = cfg["learning_rate"] * lr_mult
    elif lr_arg in params:
        call[lr_arg] = schedule
    wd, mask = cfg["weight_decay"], cfg["weight_decay_mask"]
    wd_arg = next((a for a in ("weight_decay", "weight_decay_rate") if a in params), None)
    mask_arg = next((a for a in ("mask", "weight_decay_mask") if a in params), None)
    everything = masks.is_named(mask, "all")
    if name in _OTHER_SCALE_DECAY:
        # optimizer.weight_decay is AdamW's, added after; kwargs.<own> is optax's, masked.
        if call.get(wd_arg) and mask_arg and not everything:
            call[mask_arg] = _mask_fn(mask)
        tx = fn(**call)
        return _with_decoupled_decay(tx, wd, mask, schedule)
    if wd is not None and wd_arg and (mask_arg or everything):
        call[wd_arg] = wd  # AdamW's decay: added just before the learning rate scales the step
        if mask_arg and not everything:
            call[mask_arg] = _mask_fn(mask)
        return fn(**call)
    if wd and name in _SCHEDULE_FREE:
        return _schedule_free_masked(name, call, wd, _mask_fn(mask))
    if wd is not None and wd_arg:
        call[wd_arg] = 0.0
    return _with_decoupled_decay(fn(**call), wd, mask, schedule)


def _with_decoupled_decay(
    tx: optax.GradientTransformation, wd: float | None, mask: Any, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """``tx`` followed by AdamW's ``-lr * wd * param`` on the parameters ``mask`` selects."""
    if not wd:
        return tx
    decay = decoupled_weight_decay(wd, schedule)
    if not masks.is_named(mask, "all"):
        decay = optax.masked(decay, _mask_fn(mask))
    return optax.chain(tx, decay)


def _schedule_free_masked(
    name: str, call: dict[str, Any], wd: float, mask_fn: Callable[[PyTree], PyTree]
) -> optax.GradientTransformation:
    """``optax.contrib.schedule_free_adamw``/``_sgd`` as optax builds them, with their own
    (AdamW-style) weight decay masked: optax's take no mask."""
    call = dict(call)
    defaults = {k: p.default for k, p in inspect.signature(OPTIMIZERS[name]).parameters.items()}
    lr = call.pop("learning_rate", defaults["learning_rate"])
    call.pop("warmup_steps", None)  # turned into the schedule (see _check_schedule_fits)
    decay = optax.add_decayed_weights(wd, mask_fn)
    if name == "schedule_free_adamw":
        rms = optax.scale_by_rms(
            decay=call.pop("b2", defaults["b2"]),
            eps=call.pop("eps", defaults["eps"]),
            eps_in_sqrt=False,
            bias_correction=True,
        )
        inner = optax.chain(rms, decay, optax.scale_by_learning_rate(lr))
    else:
        inner = optax.chain(decay, optax.sgd(lr))
    return optax.contrib.schedule_free(inner, learning_rate=lr, **call)


def _muon(cfg, schedule, *, total_steps, lr_mult) -> optax.GradientTransformation:
    """Muon for rank-2 non-embedding weights, AdamW for the rest."""
    kwargs = dict(cfg["kwargs"])
    adam_kwargs = {v: kwargs.pop(k) for k, v in _MUON_ADAM_KWARGS.items() if k in kwargs}
    adam_schedule = schedule
    if "adam_learning_rate" in kwargs:
        adam_cfg = dict(cfg, learning_rate=kwargs.pop("adam_learning_rate"))
        adam_schedule = _scaled(schedules.create(adam_cfg, total_steps=total_steps), lr_mult)
    wd, mask = cfg["weight_decay"], cfg["weight_decay_mask"]
    # kwargs.adam_weight_decay decays every parameter of the AdamW half, as in optax; the
    # weight_decay_mask goes with optimizer.weight_decay, which both halves take.
    adam_wd_given = "weight_decay" in adam_kwargs
    if wd is not None:
        kwargs["weight_decay"] = wd
        if not masks.is_named(mask, "all"):
            kwargs["weight_decay_mask"] = _mask_fn(mask)
        adam_kwargs.setdefault("weight_decay", wd)
    # The AdamW half is the one optax.contrib.muon builds: its defaults, Muon's eps, mu_dtype
    # and nesterov, and no weight decay unless asked for.
    defaults = {k: p.default for k, p in inspect.signature(optax.contrib.muon).parameters.items()}
    for ours, theirs in _MUON_ADAM_KWARGS.items():
        adam_kwargs.setdefault(theirs, defaults[ours])
    for shared in ("eps", "mu_dtype", "nesterov"):
        adam_kwargs[shared] = kwargs.get(shared, defaults[shared])
    if adam_kwargs["weight_decay"] and not adam_wd_given and not masks.is_named(mask, "all"):
        adam_kwargs["mask"] = _mask_fn(mask)
    muon = optax.contrib.muon(learning_rate=schedule, **kwargs)
    adamw = optax.adamw(learning_rate=adam_schedule, **adam_kwargs)
    return masks.partition(masks.is_2d_non_embedding, muon, adamw)


def optimizer_steps(total_steps: int, accumulate_steps: int) -> int:
    """The optimizer steps of ``total_steps`` training steps, ``accumulate_steps`` per update.

    Raises ``ConfigError`` unless ``accumulate_steps`` divides ``total_steps``: the micro-batches
    after the last whole update would be accumulated and never applied.
    """
    k = accumulate_steps
    if k > total_steps:
        raise ConfigError(
            f"optimizer.accumulate_steps={k} is more than the {total_steps} training steps"
        )
    if total_steps % k:
        below, above = total_steps - total_steps % k, total_steps + k - total_steps % k
        raise ConfigError(
            f"optimizer.accumulate_steps={k} does not divide the {total_steps} training steps: "
            f"the last {total_steps % k} micro-batches would never be applied (train for "
            f"{below} or {above} steps)"
        )
    return total_steps // k


def create(
    optimizer_config: Any, *, total_steps: int, params: PyTree | None = None
) -> optax.GradientTransformation:
    """Builds the optax optimizer an optimizer config describes (see the module docstring).

    Args:
      optimizer_config: ConfigDict or dict with at least ``name`` and ``learning_rate``.
      total_steps: training steps the trainer will run (micro-steps when accumulating, a
        multiple of ``accumulate_steps``); schedules get ``total_steps // accumulate_steps``
        optimizer steps.
      params: optional parameters (any pytree); when given, path regexes (``freeze``,
        ``param_groups[i].match``, ``weight_decay_mask``) that match nothing raise here. They are
        checked again when the optimizer's ``init`` first sees parameters.

    Raises:
      ConfigError (a ValueError): an unknown name, key or kwarg, a bad value, a warmup longer
        than training; the message names the key and the nearest valid choices.
    """
    cfg = check_config(optimizer_config)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be a positive int, got {total_steps!r}")
    k = cfg["accumulate_steps"]
    opt_steps = optimizer_steps(total_steps, k)
    schedule = schedules.create(cfg, total_steps=opt_steps)
    groups = groups_of(cfg)
    if params is not None:
        _check_patterns(cfg, params)

    parts: list[optax.GradientTransformation] = []
    if cfg["clip_value"] is not None:
        parts.append(optax.clip(cfg["clip_value"]))
    if cfg["clip_global_norm"] is not None:
        parts.append(optax.clip_by_global_norm(cfg["clip_global_norm"]))
    if len(groups) == 1:
        parts.append(build_optimizer(groups[0].config, total_steps=opt_steps))
    else:
        transforms = {
            g.label: build_optimizer(g.config, total_steps=opt_steps, lr_mult=g.lr_mult)
            for g in groups
        }
        parts.append(optax.partition(transforms, _group_labels(groups)))
    parts.append(record_learning_rate(schedule))
    if cfg["ema_decay"] is not None:
        parts.append(ema_params(cfg["ema_decay"]))
    tx = optax.chain(*parts)
    if k > 1:
        # Not MultiSteps.gradient_transformation(): a plain GradientTransformation, whose
        # update optax.with_extra_args_support would call without momo's value=, sophia's obj_fn=.
        multi_steps = optax.MultiSteps(tx, every_k_schedule=k)
        tx = optax.GradientTransformationExtraArgs(multi_steps.init, multi_steps.update)
    if cfg["skip_nonfinite"]:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=_MAX_CONSECUTIVE_NONFINITE)
    if _given(cfg["freeze"]):
        tx = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, _freeze_labels(cfg))
    names = _extra_args(cfg)
    if names:
        tx = require_extra_args(tx, tuple(sorted(names)), cfg["name"])
    return _checking_patterns_on_init(tx, cfg)


def _checking_patterns_on_init(
    tx: optax.GradientTransformation, cfg: dict[str, Any]
) -> optax.GradientTransformation:
    """``tx`` whose ``init`` first checks that every path regex of ``cfg`` matches a parameter."""
    if not _has_patterns(cfg):
        return tx

    def init(params: PyTree) -> optax.OptState:
        _check_patterns(cfg, params)
        return tx.init(params)

    return tx._replace(init=init)


def _has_patterns(cfg: dict[str, Any]) -> bool:
    """Whether a checked (sub-)config has a path regex that must match a parameter."""
    subs = [g["optimizer"] for g in cfg.get("param_groups", [])] + list(_wrapped(cfg).values())
    return (
        _given(cfg.get("freeze"))
        or bool(cfg.get("param_groups"))
        or _selects(cfg["weight_decay_mask"])
        or any(_has_patterns(sub) for sub in subs)
    )


def _group_labels(groups: list[Group]) -> Callable[[PyTree], PyTree]:
    def labels(params: PyTree) -> PyTree:
        groups_with_match = [(g.label, g.match) for g in groups if g.match is not None]
        return masks.labels_by_patterns(params, groups_with_match, keep_variables=True)

    return labels


def _freeze_labels(cfg: dict[str, Any]) -> Callable[[PyTree], PyTree]:
    def labels(params: PyTree) -> PyTree:
        frozen = masks.as_predicate(cfg["freeze"], tree=params)
        return masks.map_with_paths(
            lambda path, leaf: "frozen" if frozen(path, leaf) else "trainable", params
        )

    return labels


def check_patterns(optimizer_config: Any, params: PyTree) -> None:
    """Raises ``ConfigError`` for a path regex of the config that matches no parameter."""
    _check_patterns(check_config(optimizer_config), params)


def _check_patterns(cfg: dict[str, Any], params: PyTree) -> None:
    if _given(cfg["freeze"]):
        masks.check_patterns_match(params, cfg["freeze"], "optimizer.freeze")
    for i, group in enumerate(cfg["param_groups"]):
        masks.check_patterns_match(params, group["match"], f"optimizer.param_groups[{i}].match")
    _check_decay_masks(cfg, params, "optimizer")
    for i, group in enumerate(cfg["param_groups"]):
        _check_decay_masks(group["optimizer"], params, f"optimizer.param_groups[{i}].optimizer")


def _check_decay_masks(cfg: dict[str, Any], params: PyTree, where: str) -> None:
    """Checks the weight decay masks of a sub-config and of the optimizers it wraps."""
    mask, wd = cfg["weight_decay_mask"], cfg["weight_decay"]
    if _selects(mask) and wd:
        masks.check_patterns_match(params, mask, f"{where}.weight_decay_mask")
        if not any(jax.tree.leaves(masks.decay_mask(params, mask))):
            raise ConfigError(
                f"{where}.weight_decay_mask selects no parameter, so weight_decay={wd!r} would "
                "change nothing (a mask testing `'kernel' in path` on a jax key path is never "
                "true: the regex 'kernel' or a predicate (path, leaf) -> bool on plugins paths "
                "works)"
            )
    for key, sub in _wrapped(cfg).items():
        _check_decay_masks(sub, params, f"{where}.kwargs.{key}")


def _wrapped(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The checked sub-configs of the optimizers a wrapper (sam, schedule_free...) wraps."""
    kwargs = cfg["kwargs"]
    return {k: kwargs[k] for k in _SUB_OPTIMIZER_ARGS if isinstance(kwargs.get(k), dict)}


def extra_update_args(optimizer_config: Any) -> frozenset[str]:
    """Names of the keyword args ``update`` needs besides (grads, state, params): ``'value'``
    (the loss, for momo), ``'obj_fn'`` (the loss function of the params, for sophia), ...;
    empty for ordinary optimizers."""
    return _extra_args(check_config(optimizer_config))


def _extra_args(cfg: dict[str, Any]) -> frozenset[str]:
    names: set[str] = set(_EXTRA_ARGS.get(cfg["name"], ()))
    if cfg["name"] == "sam" and cfg["kwargs"].get("opaque_mode"):
        names.add("grad_fn")
    for group in cfg.get("param_groups", []):
        names |= _extra_args(group["optimizer"])
    for sub in _wrapped(cfg).values():
        names |= _extra_args(sub)
    return frozenset(names)


# The extra ``update`` arguments a train step can supply (``update_args``).
SUPPLIED_UPDATE_ARGS = frozenset({"value", "grad", "obj_fn", "value_fn"})


def update_args(
    names: Iterable[str], *, loss: jax.Array, grads: PyTree, loss_of_params: Callable
) -> dict[str, Any]:
    """The extra ``tx.update`` keyword arguments ``names`` (``extra_update_args``) from a train
    step's loss, gradients and loss function of the parameters (momo: ``value``, sophia:
    ``obj_fn``...); ``{}`` for ordinary optimizers."""
    supplies = {"value": loss, "grad": grads, "obj_fn": loss_of_params, "value_fn": loss_of_params}
    return {name: supplies[name] for name in names}


# ----------------------------------------------------------------------------- reading state


def _pure(tree: PyTree) -> PyTree:
    """Unwraps ``nnx.Variable`` leaves (``nnx.Optimizer.opt_state`` holds OptState variables)."""
    from flax import nnx

    is_variable = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def _opt_state(opt_state: PyTree) -> PyTree:
    """An optax state as pure arrays; an ``nnx.Optimizer`` stands for its ``opt_state``.

    ``nnx.state(optimizer)`` is refused: it turns optax's state tuples into plain mappings, so
    what they hold (the EMA, the learning rate, the skip count) can no longer be found.
    """
    from flax import nnx

    if isinstance(opt_state, nnx.Optimizer):
        opt_state = opt_state.opt_state
    elif isinstance(opt_state, nnx.State):
        raise TypeError(
            "got an nnx.State (nnx.state(optimizer)?): pass the optimizer or its opt_state "
            "(optimizer.opt_state) instead, which keep optax's state types"
        )
    return _pure(opt_state)


def _find(node: Any, kind: type) -> list[Any]:
    """All nodes of type ``kind`` in an optax state, outermost first."""
    if isinstance(node, kind):
        return [node]
    if isinstance(node, Mapping):
        children = list(node.values())
    elif isinstance(node, tuple | list):
        children = list(node)
    else:
        return []
    return [found for child in children for found in _find(child, kind)]


def learning_rate(opt_state: PyTree) -> jax.Array:
    """The learning rate of the last optimizer step (the schedule's value at step 0 before the
    first), read from the state of an optimizer built by :func:`create`."""
    found = _find(_opt_state(opt_state), LearningRateState)
    if not found:
        raise ValueError("this optimizer state records no learning rate: build it with create()")
    return found[0].learning_rate


def nonfinite_count(opt_state: PyTree) -> jax.Array:
    """Total updates skipped for non-finite gradients (0 when ``skip_nonfinite`` is off)."""
    found = _find(_opt_state(opt_state), optax.ApplyIfFiniteState)
    return found[0].total_notfinite if found else jnp.zeros([], jnp.int32)


def keep_if_skipped(opt_state: PyTree, new: PyTree, old: PyTree) -> PyTree:
    """``new``, or ``old`` where the optimizer step that produced ``opt_state`` skipped its
    update for non-finite gradients (``skip_nonfinite``; always ``new`` when that is off).

    For state a train step changes beside the optimizer, such as batch-norm statistics: a
    NaN batch skips its parameter update and must leave those untouched as well.
    """
    found = _find(_opt_state(opt_state), optax.ApplyIfFiniteState)
    if not found:
        return new
    applied = found[0].last_finite
    return jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _fill_masked(params: PyTree, values: PyTree) -> PyTree:
    """``values`` where it holds an array, ``params`` where it holds a ``MaskedNode``."""
    return jax.tree.map(
        lambda v, p: p if _is_masked(v) else v,
        values,
        params,
        is_leaf=_is_masked,
    )


def eval_params(opt_state: PyTree, params: PyTree) -> PyTree:
    """The parameters to evaluate with: the EMA when ``ema_decay`` is set, schedule-free's
    evaluation point for schedule-free optimizers, else ``params`` unchanged.

    Works on raw optax states, on ``nnx.Optimizer.opt_state`` and on the ``nnx.Optimizer``
    itself (as do ``learning_rate``, ``nonfinite_count`` and ``keep_if_skipped``; an
    ``nnx.state(optimizer)`` is a TypeError); the result has the structure of ``params`` (pure
    arrays where ``params`` holds pure arrays).
    """
    state = _opt_state(opt_state)
    pure_params = _pure(params)
    ema = _find(state, EmaParamsState)
    if ema:
        out = _fill_masked(pure_params, ema[0].ema)
        return jax.tree.map(lambda e, p: e.astype(p.dtype), out, pure_params)
    sf = _find(state, optax.contrib.ScheduleFreeState)
    if sf:
        z = sf[0].z
        masked_params = jax.tree.map(
            lambda zi, p: zi if _is_masked(zi) else p, z, pure_params, is_leaf=_is_masked
        )
        evaluated = optax.contrib.schedule_free_eval_params(sf[0], masked_params)
        return _fill_masked(pure_params, evaluated)
    return params


# ----------------------------------------------------------------------------- summary


def _describe(
    cfg: dict[str, Any], leaf_path: masks.Path, leaf: Any, decays: masks.Predicate
) -> tuple[str, str]:
    """(transform name, weight decay) for one parameter of one group's optimizer config, whose
    weight-decay mask is ``decays``."""
    name = cfg["name"]
    if name == "muon":
        name = "muon" if masks.is_2d_non_embedding(leaf_path, leaf) else "adamw"
        adam_wd = cfg["kwargs"].get("adam_weight_decay")
        if name == "adamw" and adam_wd is not None:  # every parameter of the AdamW half
            return name, f"{adam_wd:g}"
    wd = cfg["weight_decay"]
    if wd is None:
        return name, "default"
    return name, f"{wd:g}" if decays(leaf_path, leaf) else "0"


def summary(
    params: PyTree,
    optimizer_config: Any,
    *,
    total_steps: int,
    mesh: Any = None,
    partition: Callable[[str, Any], Any] | None = None,
) -> str:
    """A table of every parameter: path, shape, size, group, lr multiplier, weight decay, frozen,
    and which transform updates it; then totals for parameters and optimizer state.

    With a ``mesh`` (and ``partition``, ``(path, leaf) -> PartitionSpec | None``, e.g.
    ``plugins.sharding.partition_rule(mesh)``), each parameter's sharding and the bytes one
    device holds of it, and the totals per device of parameters and optimizer state."""
    cfg = check_config(optimizer_config)
    tx = create(optimizer_config, total_steps=total_steps, params=params)
    groups = groups_of(cfg)
    frozen = masks.as_predicate(cfg["freeze"], tree=params) if _given(cfg["freeze"]) else None
    # Each selection once: a mask function is evaluated on the whole tree.
    matches = {
        g.label: masks.as_predicate(g.match, tree=params) for g in groups if g.match is not None
    }
    decays = {
        g.label: masks.decay_predicate(g.config["weight_decay_mask"], tree=params) for g in groups
    }
    split = _splitter(mesh, partition)
    rows = []
    for path, leaf in zip(masks.leaf_paths(params), jax.tree.leaves(params), strict=True):
        shape = tuple(getattr(leaf, "shape", ()))
        size = int(getattr(leaf, "size", 1))
        placed = split(str(path), leaf) if split else ()
        if frozen is not None and frozen(path, leaf):
            rows.append((str(path), str(shape), size, "-", "-", "-", "yes", "frozen", *placed))
            continue
        group = next(g for g in groups if g.match is None or matches[g.label](path, leaf))
        transform, wd = _describe(group.config, path, leaf, decays[group.label])
        rows.append(
            (str(path), str(shape), size, group.label, f"{group.lr_mult:g}", wd, "no", transform)
            + placed
        )
    state_shapes = jax.eval_shape(tx.init, params)
    state_leaves = [x for x in jax.tree.leaves(state_shapes) if hasattr(x, "shape")]
    state_size = sum(int(x.size) for x in state_leaves)
    state_bytes = sum(int(x.size) * x.dtype.itemsize for x in state_leaves)
    param_leaves = jax.tree.leaves(params)
    n_params = sum(int(getattr(x, "size", 1)) for x in param_leaves)
    param_bytes = sum(int(x.size) * x.dtype.itemsize for x in param_leaves if hasattr(x, "dtype"))
    n_frozen = sum(r[2] for r in rows if r[6] == "yes")

    header = ("path", "shape", "size", "group", "lr_mult", "weight_decay", "frozen", "transform")
    if split:
        header += ("sharding", "bytes/device")
    table = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ratio = state_size / n_params if n_params else 0.0
    trainable = n_params - n_frozen
    lines += [
        "",
        f"parameters:      {n_params:,} ({_bytes(param_bytes)}), "
        f"trainable {trainable:,}, frozen {n_frozen:,}",
        f"optimizer state: {state_size:,} values ({_bytes(state_bytes)}) "
        f"= {ratio:.2f}x the parameters"
        + (f", {state_size / trainable:.2f}x the trainable ones" if n_frozen and trainable else ""),
    ]
    if split:
        params_here = sum(int(r[-1]) for r in rows)
        state_paths = masks.leaf_paths(state_shapes)
        state_here = sum(
            int(split(str(p), x)[1])
            for p, x in zip(state_paths, jax.tree.leaves(state_shapes), strict=True)
            if hasattr(x, "shape")
        )
        lines.append(
            f"per device ({mesh.size} devices, mesh {dict(mesh.shape)}): parameters "
            f"{_bytes(params_here)}, optimizer state {_bytes(state_here)}"
        )
    return "\n".join(lines)


def _splitter(mesh: Any, partition: Callable[[str, Any], Any] | None):
    """``(path, leaf) -> (spec text, bytes one device holds)`` on ``mesh``, or None."""
    if mesh is None:
        return None

    def split(path: str, leaf: Any) -> tuple[str, int]:
        spec = partition(path, leaf) if partition else None
        itemsize = jnp.dtype(getattr(leaf, "dtype", jnp.float32)).itemsize
        nbytes = int(getattr(leaf, "size", 1)) * itemsize
        parts = 1
        for names in tuple(spec or ()):
            for name in () if names is None else (names,) if isinstance(names, str) else names:
                parts *= mesh.shape[name]
        text = "replicated" if not spec or all(n is None for n in spec) else str(tuple(spec))
        return text, nbytes // parts

    return split


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
