"""plugins.schedules: every schedule equals the hand-written optax schedule; errors name the key."""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from plugins import schedules
from plugins.config_errors import ConfigError

PEAK = 1e-3
TOTAL = 1000
STEPS = np.arange(0, TOTAL + 50)  # past the end too: what happens after training is defined


def values(schedule: optax.Schedule, steps=STEPS) -> np.ndarray:
    """A schedule evaluated step by step, as the optimizer calls it (jitted, scalar int32)."""
    fn = jax.jit(jax.vmap(lambda s: jnp.asarray(schedule(s), jnp.float32)))
    return np.asarray(fn(jnp.asarray(steps, jnp.int32)))


def ours(schedule=None, total=TOTAL, lr=PEAK) -> np.ndarray:
    cfg = ml_collections.ConfigDict(dict(name="adamw", learning_rate=lr, schedule=schedule))
    return values(schedules.create(cfg, total_steps=total))


def check(schedule, reference, total=TOTAL):
    np.testing.assert_allclose(ours(schedule, total), values(reference), rtol=1e-6, atol=1e-12)


# -- every schedule against hand-written optax ---------------------------------------------------


def test_constant_when_no_schedule():
    check(None, optax.constant_schedule(PEAK))
    check(dict(name="constant"), optax.constant_schedule(PEAK))
    check("constant", optax.constant_schedule(PEAK))


def test_linear_warmup():
    check(
        dict(name="linear_warmup", warmup_steps=100),
        optax.warmup_constant_schedule(0.0, PEAK, 100),
    )
    check(
        dict(name="linear_warmup", warmup_steps=100, init_value=1e-5),
        optax.linear_schedule(1e-5, PEAK, 100),
    )


def test_cosine():
    check(dict(name="cosine"), optax.cosine_decay_schedule(PEAK, TOTAL))
    check(
        dict(name="cosine", decay_steps=600, end_value=1e-5, exponent=2.0),
        optax.cosine_decay_schedule(PEAK, 600, alpha=1e-5 / PEAK, exponent=2.0),
    )
    check(dict(name="cosine", alpha=0.1), optax.cosine_decay_schedule(PEAK, TOTAL, alpha=0.1))


def test_warmup_cosine_ends_at_total_steps():
    cfg = dict(name="warmup_cosine", warmup_steps=100, end_value=1e-5, init_value=1e-6)
    check(cfg, optax.warmup_cosine_decay_schedule(1e-6, PEAK, 100, TOTAL, 1e-5))
    lr = ours(cfg)
    assert lr[100] == pytest.approx(PEAK)
    assert lr[TOTAL] == pytest.approx(1e-5)  # optax's decay_steps includes the warmup
    check(
        dict(name="warmup_cosine", warmup_steps=50, exponent=0.5),
        optax.warmup_cosine_decay_schedule(0.0, PEAK, 50, TOTAL, exponent=0.5),
    )
    # No warmup: plain cosine over the whole run.
    check(dict(name="warmup_cosine"), optax.cosine_decay_schedule(PEAK, TOTAL))


def test_warmup_cosine_decay_steps_as_optax_writes_them():
    """The cheat sheet's ``warmup_cosine_decay_schedule(..., warmup_steps, decay_steps)``: the
    decay ends at ``decay_steps`` (warmup included) and ``end_value`` holds after it."""
    cfg = dict(name="warmup_cosine", warmup_steps=100, decay_steps=600, end_value=1e-5)
    check(cfg, optax.warmup_cosine_decay_schedule(0.0, PEAK, 100, 600, 1e-5))
    assert ours(cfg)[TOTAL] == pytest.approx(1e-5)
    check(
        dict(name="warmup_cosine", decay_steps=0.5),
        optax.cosine_decay_schedule(PEAK, TOTAL // 2),
    )
    msg = error(dict(name="warmup_cosine", warmup_steps=100, decay_steps=50))
    assert "optimizer.schedule.decay_steps (50) is the length of warmup and decay" in msg


@pytest.mark.parametrize(
    "schedule, n",
    [
        (dict(warmup_steps=100, decay_steps=100), 100),
        (dict(warmup_steps=0.5, decay_steps=0.5), TOTAL // 2),
    ],
)
def test_warmup_cosine_with_decay_steps_equal_to_warmup_steps_is_refused_as_optax_does(schedule, n):
    """The warmup would end at end_value without reaching the peak; optax refuses it too.
    (Both equal to the whole run is a warmup over all of training: see the test below.)"""
    with pytest.raises(ValueError):
        optax.warmup_cosine_decay_schedule(0.0, PEAK, n, n, 1e-5)
    msg = error(dict(name="warmup_cosine", end_value=1e-5, **schedule))
    assert f"optimizer.schedule.decay_steps ({n})" in msg
    assert f"more than optimizer.schedule.warmup_steps ({n})" in msg
    # One step less of warmup reaches the peak and decays as optax's does.
    check(
        dict(name="warmup_cosine", warmup_steps=n - 1, decay_steps=n, end_value=1e-5),
        optax.warmup_cosine_decay_schedule(0.0, PEAK, n - 1, n, 1e-5),
    )


def test_warmup_linear():
    reference = optax.join_schedules(
        [optax.linear_schedule(0.0, PEAK, 100), optax.linear_schedule(PEAK, 1e-5, TOTAL - 100)],
        [100],
    )
    check(dict(name="warmup_linear", warmup_steps=100, end_value=1e-5), reference)
    assert ours(dict(name="warmup_linear", warmup_steps=100))[TOTAL] == pytest.approx(0, abs=1e-9)
    check(dict(name="warmup_linear"), optax.linear_schedule(PEAK, 0.0, TOTAL))


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential(staircase):
    check(
        dict(name="exponential", transition_steps=100, decay_rate=0.5, staircase=staircase),
        optax.exponential_decay(PEAK, 100, 0.5, staircase=staircase),
    )
    check(
        dict(
            name="exponential",
            transition_steps=50,
            decay_rate=0.9,
            transition_begin=200,
            end_value=2e-4,
            staircase=staircase,
        ),
        optax.exponential_decay(PEAK, 50, 0.9, 200, staircase, end_value=2e-4),
    )


def test_piecewise_constant_int_and_str_keys_and_lists():
    reference = optax.piecewise_constant_schedule(PEAK, {300: 0.1, 700: 0.5})
    check(dict(name="piecewise_constant", boundaries_and_scales={300: 0.1, 700: 0.5}), reference)
    # ml_collections only allows str keys; a ConfigDict of them works as well.
    str_keys = ml_collections.ConfigDict({"300": 0.1, "700": 0.5})
    check(dict(name="piecewise_constant", boundaries_and_scales=str_keys), reference)
    check(dict(name="piecewise_constant", boundaries=[300, 700], scales=[0.1, 0.5]), reference)
    # Fractions of total_steps: as lists (works in a ConfigDict) or, in a plain dict, as keys.
    check(dict(name="piecewise_constant", boundaries=[0.3, 0.7], scales=[0.1, 0.5]), reference)
    plain = dict(
        learning_rate=PEAK,
        schedule=dict(name="piecewise_constant", boundaries_and_scales={"0.3": 0.1, 0.7: 0.5}),
    )
    np.testing.assert_allclose(
        values(schedules.create(plain, total_steps=TOTAL)), values(reference), rtol=1e-6
    )
    lr = ours(dict(name="piecewise_constant", boundaries_and_scales={"300": 0.1, "700": 0.5}))
    np.testing.assert_allclose(lr[[0, 299, 300, 699, 700]], [1e-3, 1e-3, 1e-4, 1e-4, 5e-5])


def test_rsqrt():
    lr = ours(dict(name="rsqrt", warmup_steps=100))
    steps = STEPS.astype(np.float64)
    expected = np.where(steps < 100, PEAK * steps / 100, PEAK * np.sqrt(100 / np.maximum(steps, 1)))
    np.testing.assert_allclose(lr, expected, rtol=1e-6)
    reference = optax.join_schedules(
        [
            optax.linear_schedule(0.0, PEAK, 100),
            lambda s: PEAK / jnp.sqrt(1.0 + s / 400.0),
        ],
        [100],
    )
    check(dict(name="rsqrt", warmup_steps=100, timescale=400), reference)
    check(dict(name="rsqrt", timescale=10), lambda s: PEAK / jnp.sqrt(1.0 + s / 10.0))


@pytest.mark.parametrize("name", ["warmup_stable_decay", "wsd"])
def test_warmup_stable_decay_linear(name):
    reference = optax.join_schedules(
        [
            optax.linear_schedule(0.0, PEAK, 100),
            optax.constant_schedule(PEAK),
            optax.linear_schedule(PEAK, 1e-5, 200),
        ],
        [100, 800],
    )
    check(dict(name=name, warmup_steps=100, decay_steps=200, end_value=1e-5), reference)
    lr = ours(dict(name=name, warmup_steps=100, decay_steps=200, end_value=1e-5))
    assert lr[TOTAL] == pytest.approx(1e-5, rel=1e-4)


def test_warmup_stable_decay_shapes():
    reference = optax.join_schedules(
        [
            optax.linear_schedule(0.0, PEAK, 100),
            optax.constant_schedule(PEAK),
            optax.cosine_decay_schedule(PEAK, 200),
        ],
        [100, 800],
    )
    check(dict(name="wsd", warmup_steps=100, decay_steps=200, decay_shape="cosine"), reference)
    lr = ours(dict(name="wsd", warmup_steps=0.1, decay_steps=0.2, decay_shape="sqrt"))
    t = np.clip(STEPS - 800, 0, 200) / 200
    np.testing.assert_allclose(lr[800:], PEAK * (1 - np.sqrt(t[800:])), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(lr[100:800], PEAK, rtol=1e-6)


def test_one_cycle():
    check(dict(name="one_cycle"), optax.cosine_onecycle_schedule(TOTAL, PEAK))
    check(
        dict(name="one_cycle", pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
        optax.cosine_onecycle_schedule(TOTAL, PEAK, 0.25, 10.0, 100.0),
    )


def test_sgdr():
    cycle = dict(init_value=0.0, peak_value=PEAK, warmup_steps=20, decay_steps=250, end_value=1e-5)
    check(
        dict(name="sgdr", num_cycles=4, warmup_steps=20, end_value=1e-5),
        optax.sgdr_schedule([cycle] * 4),
    )
    check(
        dict(name="sgdr", cycle_steps=250, warmup_steps=20, end_value=1e-5),
        optax.sgdr_schedule([cycle] * 4),
    )
    no_warmup = [optax.cosine_decay_schedule(PEAK, 250)] * 4
    check(dict(name="sgdr", num_cycles=4), optax.join_schedules(no_warmup, [250, 500, 750]))


def test_sgdr_cycle_mult():
    # Cycles 100, 200, 400, ... from cycle_steps; num_cycles=3 with mult 2 splits 700 the same.
    lengths = [100, 200, 400, 800]
    reference = optax.join_schedules(
        [optax.cosine_decay_schedule(PEAK, n) for n in lengths], [100, 300, 700]
    )
    check(dict(name="sgdr", cycle_steps=100, cycle_mult=2.0), reference)
    reference = optax.join_schedules(
        [optax.cosine_decay_schedule(PEAK, n) for n in lengths[:3]], [100, 300]
    )
    check(dict(name="sgdr", num_cycles=3, cycle_mult=2.0), reference, total=700)


# -- lengths as fractions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "as_steps, as_fraction",
    [
        (
            dict(name="linear_warmup", warmup_steps=100),
            dict(name="linear_warmup", warmup_steps=0.1),
        ),
        (dict(name="cosine", decay_steps=500), dict(name="cosine", decay_steps=0.5)),
        (dict(name="cosine", decay_steps=1000), dict(name="cosine", decay_steps=1.0)),
        (
            dict(name="warmup_cosine", warmup_steps=50),
            dict(name="warmup_cosine", warmup_steps=0.05),
        ),
        (
            dict(name="warmup_linear", warmup_steps=250),
            dict(name="warmup_linear", warmup_steps=0.25),
        ),
        (
            dict(name="exponential", transition_steps=100, decay_rate=0.5, transition_begin=200),
            dict(name="exponential", transition_steps=0.1, decay_rate=0.5, transition_begin=0.2),
        ),
        (dict(name="rsqrt", warmup_steps=100), dict(name="rsqrt", warmup_steps=0.1)),
        (
            dict(name="wsd", warmup_steps=100, decay_steps=300),
            dict(name="wsd", warmup_steps=0.1, decay_steps=0.3),
        ),
        (dict(name="sgdr", cycle_steps=250), dict(name="sgdr", cycle_steps=0.25)),
        (
            dict(name="join", phases=[dict(name="constant", steps=300), dict(name="cosine")]),
            dict(name="join", phases=[dict(name="constant", steps=0.3), dict(name="cosine")]),
        ),
        # Integral floats above 1 are step counts (1e2 is the same as 100).
        (
            dict(name="linear_warmup", warmup_steps=100),
            dict(name="linear_warmup", warmup_steps=1e2),
        ),
    ],
)
def test_fraction_lengths_equal_step_lengths(as_steps, as_fraction):
    np.testing.assert_array_equal(ours(as_steps), ours(as_fraction))


# -- joined phases --------------------------------------------------------------------------------


def test_join_continues_across_boundaries():
    cfg = dict(
        name="join",
        phases=[
            dict(name="linear_warmup", warmup_steps=1.0, steps=100),
            dict(name="constant", steps=0.4),
            dict(name="cosine", end_value=1e-5),  # takes the remaining 500 steps
        ],
    )
    lr = ours(cfg)
    reference = optax.join_schedules(
        [
            optax.linear_schedule(0.0, PEAK, 100),
            optax.constant_schedule(PEAK),
            optax.cosine_decay_schedule(PEAK, 500, alpha=1e-5 / PEAK),
        ],
        [100, 500],
    )
    np.testing.assert_allclose(lr, values(reference), rtol=1e-6)
    # Continuous at both boundaries: the step into each phase changes the LR by at most one
    # warmup step's worth.
    assert abs(lr[100] - lr[99]) <= PEAK / 100 + 1e-9
    assert lr[499] == pytest.approx(PEAK) and lr[500] == pytest.approx(PEAK)
    assert lr[TOTAL - 1] == pytest.approx(1e-5, rel=1e-3)


def test_join_phase_learning_rate_and_nested_fractions():
    # High LR for 200 steps, a tenth of it for 300, then linear decay from there to zero.
    cfg = ml_collections.ConfigDict(
        dict(
            name="join",
            phases=[
                dict(name="constant", steps=200),
                dict(name="constant", steps=300, learning_rate=PEAK / 10),
                dict(name="warmup_linear", learning_rate=PEAK / 10, warmup_steps=0.1),
            ],
        )
    )
    lr = ours(cfg)
    reference = optax.join_schedules(
        [
            optax.constant_schedule(PEAK),
            optax.constant_schedule(PEAK / 10),
            optax.join_schedules(  # warmup is 10% of the 500-step phase
                [
                    optax.linear_schedule(0.0, PEAK / 10, 50),
                    optax.linear_schedule(PEAK / 10, 0.0, 450),
                ],
                [50],
            ),
        ],
        [200, 500],
    )
    np.testing.assert_allclose(lr, values(reference), rtol=1e-6)


def test_join_fractions_rounding_to_total():
    thirds = dict(name="join", phases=[dict(name="constant", steps=1 / 3)] * 3)
    assert ours(thirds).shape == STEPS.shape  # 333 + 333 + 334: rounding is absorbed


# -- curve, text plot, PNG ------------------------------------------------------------------------


def test_curve_matches_schedule_and_is_fast():
    cfg = dict(learning_rate=PEAK, schedule=dict(name="warmup_cosine", warmup_steps=0.1))
    lr = schedules.curve(cfg, total_steps=TOTAL)
    assert lr.shape == (TOTAL,) and lr.dtype == np.float32
    np.testing.assert_allclose(lr, ours(dict(name="warmup_cosine", warmup_steps=0.1))[:TOTAL])
    big = schedules.curve(
        dict(learning_rate=PEAK, schedule=dict(name="one_cycle")), total_steps=1_000_000
    )
    assert big.shape == (1_000_000,)
    assert big.max() == pytest.approx(PEAK, rel=1e-5)


def test_curve_of_constant_broadcasts():
    np.testing.assert_array_equal(
        schedules.curve(dict(learning_rate=0.5), total_steps=7), [0.5] * 7
    )


def test_text_plot_labels():
    cfg = dict(learning_rate=3e-4, schedule=dict(name="warmup_cosine", warmup_steps=100))
    text = schedules.text_plot(cfg, total_steps=TOTAL, width=40, height=8)
    lines = text.splitlines()
    assert "warmup_cosine" in lines[0]
    assert "peak 0.0003 at step 100" in lines[0]
    assert "final" in lines[0]
    assert lines[1].lstrip().startswith("0.0003 |")  # top of the y axis is the peak
    assert lines[8].lstrip().startswith("0 |")
    assert lines[-1].split()[:2] == ["0", "999"]
    assert sum(line.count("*") for line in lines[1:-2]) == 40  # one point per column


def test_save_plot_writes_png(tmp_path):
    cfg = dict(learning_rate=PEAK, schedule=dict(name="sgdr", num_cycles=3))
    path = schedules.save_plot(cfg, total_steps=300, path=tmp_path / "sub" / "lr.png")
    assert path == str(tmp_path / "sub" / "lr.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_frozen_config_dict_and_plain_dict_agree():
    sched = dict(name="warmup_cosine", warmup_steps=10)
    frozen = ml_collections.FrozenConfigDict(dict(learning_rate=PEAK, schedule=sched))
    a = values(schedules.create(frozen, total_steps=100))
    b = values(schedules.create(dict(learning_rate=PEAK, schedule=sched), total_steps=100))
    np.testing.assert_array_equal(a, b)


def test_names():
    assert set(schedules.NAMES) >= {
        "constant",
        "linear_warmup",
        "cosine",
        "warmup_cosine",
        "warmup_linear",
        "exponential",
        "piecewise_constant",
        "rsqrt",
        "warmup_stable_decay",
        "wsd",
        "one_cycle",
        "sgdr",
        "join",
    }


# -- errors ---------------------------------------------------------------------------------------


def error(schedule, *, total=TOTAL, lr=PEAK) -> str:
    cfg = ml_collections.ConfigDict(dict(learning_rate=lr, schedule=schedule))
    with pytest.raises(ConfigError) as info:
        schedules.create(cfg, total_steps=total)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_unknown_name_suggests_nearest():
    msg = error(dict(name="warmup_cosin", warmup_steps=10))
    assert "optimizer.schedule.name" in msg
    assert "did you mean 'warmup_cosine'" in msg
    assert "did you mean 'sgdr'" in error("sgdrr")
    assert "'one_cycle'" in error(dict(name="onecycle"))


def test_unknown_key_suggests_nearest():
    msg = error(dict(name="warmup_cosine", warmup_step=10))
    assert "optimizer.schedule.warmup_step" in msg and "did you mean 'warmup_steps'" in msg
    msg = error(dict(name="join", phases=[dict(name="constant", step=10), dict(name="cosine")]))
    assert "optimizer.schedule.phases[0].step" in msg and "'steps'" in msg


def test_a_key_of_another_schedule_says_so():
    # What --config.optimizer.schedule.name=cosine leaves behind from warmup_cosine.
    msg = error(dict(name="cosine", warmup_steps=10, end_value=0.0))
    assert msg.startswith(
        "optimizer.schedule.warmup_steps is not an option of schedule 'cosine' "
        "(its options: alpha, decay_steps, end_value, exponent) but of 'linear_warmup',"
    ), msg
    assert "or switch it in the config file" in msg


_SCHEDULE_CONFIG = """
import ml_collections

def get_config():
    return ml_collections.ConfigDict(dict(num_train_steps=1000, optimizer=dict(
        name='adamw', learning_rate=1e-3,
        schedule=dict(name='warmup_cosine', warmup_steps=100, end_value=1e-5))))
"""


def _parse_config(path, *overrides):
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, sys_argv=argv, lock_config=True
    )
    fv(argv)
    return fv.config


@pytest.mark.parametrize(
    "name, reference",
    [
        ("constant", optax.constant_schedule(PEAK)),
        ("cosine", optax.cosine_decay_schedule(PEAK, TOTAL, alpha=1e-5 / PEAK)),
    ],
)
def test_switching_the_schedule_on_the_command_line_takes_the_command_the_error_gives(
    tmp_path, name, reference
):
    """``--config.optimizer.schedule.name=X`` keeps the file's other keys and is refused with
    one line giving the one command that switches: the whole dict, whose keys the new schedule
    has (end_value for cosine) kept and the others left to their defaults."""
    import re

    path = tmp_path / "cfg.py"
    path.write_text(_SCHEDULE_CONFIG)
    config = _parse_config(path, f"--config.optimizer.schedule.name={name}")
    with pytest.raises(ConfigError) as info:
        schedules.create(config.optimizer, total_steps=TOTAL)
    msg = str(info.value)
    assert "\n" not in msg
    found = re.search(r'(--config\.optimizer\.schedule)="(\{[^"]*\})"', msg)
    assert found, msg
    flag, value = found.groups()
    config = _parse_config(path, f"{flag}={value}")
    assert config.optimizer.schedule.name == name
    got = values(schedules.create(config.optimizer, total_steps=TOTAL))
    np.testing.assert_allclose(got, values(reference), rtol=1e-6, atol=1e-12)


def test_missing_name_and_required_keys():
    assert "optimizer.schedule.name" in error(dict(warmup_steps=10))
    assert "optimizer.schedule.warmup_steps" in error(dict(name="linear_warmup"))
    assert "optimizer.schedule.decay_rate" in error(dict(name="exponential", transition_steps=10))
    assert "optimizer.schedule.num_cycles" in error(dict(name="sgdr"))
    assert "optimizer.schedule.boundaries_and_scales" in error(dict(name="piecewise_constant"))
    assert "optimizer.schedule.timescale" in error(dict(name="rsqrt"))


def test_warmup_longer_than_training():
    for name in ["linear_warmup", "warmup_cosine", "warmup_linear", "rsqrt", "wsd"]:
        msg = error(dict(name=name, warmup_steps=TOTAL + 1))
        assert "optimizer.schedule.warmup_steps" in msg and "longer than training" in msg
    msg = error(dict(name="wsd", warmup_steps=600, decay_steps=500))
    assert "optimizer.schedule.decay_steps" in msg
    msg = error(dict(name="sgdr", num_cycles=4, warmup_steps=250))
    assert "optimizer.schedule.warmup_steps" in msg


def test_warmup_equal_to_training_is_fine():
    lr = ours(dict(name="warmup_cosine", warmup_steps=1.0))
    np.testing.assert_allclose(lr[:TOTAL], PEAK * np.arange(TOTAL) / TOTAL, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("lr", [0.0, -1e-3, "1e-3", None, float("nan"), True])
def test_bad_learning_rate(lr):
    msg = error(dict(name="cosine"), lr=lr)
    assert "optimizer.learning_rate" in msg


@pytest.mark.parametrize("total", [0, -5, 2.5, "100"])
def test_bad_total_steps(total):
    assert "total_steps" in error(dict(name="cosine"), total=total)


def test_negative_and_malformed_lengths():
    msg = error(dict(name="warmup_cosine", warmup_steps=-10))
    assert "optimizer.schedule.warmup_steps" in msg and "negative" in msg
    assert "optimizer.schedule.decay_steps" in error(dict(name="cosine", decay_steps=-0.5))
    assert "optimizer.schedule.warmup_steps" in error(dict(name="warmup_cosine", warmup_steps=2.5))
    assert "optimizer.schedule.warmup_steps" in error(dict(name="warmup_cosine", warmup_steps="10"))
    assert "optimizer.schedule.transition_steps" in error(
        dict(name="exponential", transition_steps=0, decay_rate=0.5)
    )
    msg = error(dict(name="join", phases=[dict(name="constant", steps=-3), dict(name="cosine")]))
    assert "optimizer.schedule.phases[0].steps" in msg


def test_phases_that_do_not_add_up():
    msg = error(
        dict(name="join", phases=[dict(name="constant", steps=300), dict(name="cosine", steps=600)])
    )
    assert "optimizer.schedule.phases" in msg and "900" in msg and "1000" in msg
    msg = error(dict(name="join", phases=[dict(name="constant", steps=1000), dict(name="cosine")]))
    assert "optimizer.schedule.phases" in msg and "none" in msg
    msg = error(dict(name="join", phases=[dict(name="constant"), dict(name="cosine")]))
    assert "optimizer.schedule.phases[1].steps" in msg
    assert "optimizer.schedule.phases" in error(dict(name="join", phases=[]))
    msg = error(dict(name="join", phases=[dict(name="cosin")]))
    assert "optimizer.schedule.phases[0].name" in msg and "'cosine'" in msg
    msg = error(
        dict(
            name="join",
            phases=[dict(name="warmup_cosine", warmup_steps=200, steps=100), dict(name="constant")],
        ),
    )
    assert "optimizer.schedule.phases[0].warmup_steps" in msg


def test_other_bad_values():
    msg = error(dict(name="wsd", decay_shape="cosin"))
    assert "optimizer.schedule.decay_shape" in msg and "'cosine'" in msg
    msg = error(dict(name="cosine", alpha=0.1, end_value=1e-5))
    assert "optimizer.schedule.alpha" in msg
    msg = error(dict(name="piecewise_constant", boundaries_and_scales={"100": -0.1}))
    assert "optimizer.schedule.boundaries_and_scales" in msg
    msg = error(dict(name="piecewise_constant", boundaries_and_scales={"ten": 0.1}))
    assert "optimizer.schedule.boundaries_and_scales" in msg and "'ten'" in msg
    msg = error(dict(name="piecewise_constant", boundaries=[100, 200], scales=[0.1]))
    assert "optimizer.schedule.boundaries" in msg and "optimizer.schedule.scales" in msg
    msg = error(dict(name="one_cycle", pct_start=1.5))
    assert "optimizer.schedule.pct_start" in msg
    msg = error(dict(name="exponential", transition_steps=10, decay_rate=0.5, staircase="yes"))
    assert "optimizer.schedule.staircase" in msg
    msg = error(dict(name="sgdr", num_cycles=2, cycle_steps=100))
    assert "optimizer.schedule.num_cycles" in msg
    msg = error(dict(name="sgdr", num_cycles=2000))
    assert "optimizer.schedule.num_cycles" in msg


_COMPILED: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **kwargs: (
        _COMPILED.append(str(kwargs.get("fun_name", name)))
        if name.startswith("/jax/core/compile/")
        else None
    )
)


def test_errors_come_before_compiling():
    """create() validates eagerly: a bad config is an error before any JAX computation is
    compiled."""
    _COMPILED.clear()
    error(dict(name="warmup_cosine", warmup_steps=TOTAL * 2))
    error(dict(name="sgdr", num_cycles=2000))
    assert _COMPILED == []
    jax.jit(lambda x: x * 3 + 1)(1.0)  # a function never compiled before: the listener sees it
    assert _COMPILED


def test_custom_where_prefix():
    with pytest.raises(
        ConfigError, match=r"optimizer\.param_groups\[0\]\.optimizer\.learning_rate"
    ):
        schedules.create(
            dict(learning_rate=-1), total_steps=10, where="optimizer.param_groups[0].optimizer"
        )


def test_sampled_curve_is_bounded_whatever_the_number_of_steps():
    cfg = dict(learning_rate=PEAK, schedule=dict(name="warmup_cosine", warmup_steps=0.1))
    steps, values = schedules.sampled_curve(cfg, total_steps=2**31 - 1, points=1001)
    assert len(steps) == len(values) <= 1001
    assert steps[0] == 0 and steps[-1] == 2**31 - 2
    small_steps, small = schedules.sampled_curve(cfg, total_steps=TOTAL)
    np.testing.assert_array_equal(small_steps, np.arange(TOTAL))
    np.testing.assert_array_equal(small, schedules.curve(cfg, total_steps=TOTAL))
