import math

import pytest

from relora_dist.relora.schedule import (ScheduleError, is_reset_step, jagged_cosine, validate_jagged,
                                  warmup_cosine)

CONFIGS = [
    # total, first_warmup, restart_warmup, cycle_length, min_lr_ratio
    (1000, 50, 10, 100, 0.1),
    (600, 100, 25, 100, 0.1),   # first_warmup == cycle_length
    (400, 0, 1, 100, 1.0),      # no first warmup, constant envelope
    (20000, 500, 100, 5000, 0.1),
    (200, 20, 7, 200, 0.05),    # single cycle: no reset
]


def _env(p, m):
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))


def _reference(current_step, num_training_steps, first_warmup_steps, restart_warmup_steps,
               restart_every, min_lr_ratio):
    # transcription of the reference's _get_cosine_schedule_with_multiple_warmups_lambda (adjust_step=0)
    if current_step < first_warmup_steps:
        return float(current_step) / float(max(1, first_warmup_steps))
    restart_step = current_step % restart_every
    restart_number = current_step // restart_every
    if restart_step < restart_warmup_steps and current_step >= restart_every:
        end_of_warmup_progress = (float(restart_number * restart_every + restart_warmup_steps - first_warmup_steps)
                                  / float(max(1, num_training_steps - first_warmup_steps)))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = float(current_step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_reference_formula(cfg):
    T = cfg[0]
    for t in range(T + 1):
        assert jagged_cosine(t, *cfg) == pytest.approx(_reference(t, *cfg), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_zero_exactly_at_reset_steps(cfg):
    T, W1, Wr, C, m = cfg
    resets = [t for t in range(T) if is_reset_step(t, C, T)]
    assert resets == list(range(C, T, C))
    assert len(resets) == T // C - 1
    for t in resets:
        assert jagged_cosine(t, *cfg) == 0.0
    # no other step in the phase runs at LR 0 except t = 0 of the first warmup
    zeros = [t for t in range(T) if jagged_cosine(t, *cfg) == 0.0]
    assert zeros == ([0] if W1 > 0 else []) + resets


@pytest.mark.parametrize("cfg", CONFIGS)
def test_continuous_with_envelope_and_below_it(cfg):
    T, W1, Wr, C, m = cfg
    env = lambda t: _env(min(1.0, (t - W1) / max(1, T - W1)), m)
    for t in range(W1, T):
        assert jagged_cosine(t, *cfg) <= env(t) + 1e-15
    for n in range(1, T // C):
        end = n * C + Wr
        lam = jagged_cosine(end, *cfg)
        assert lam == pytest.approx(env(end), abs=1e-15)  # back on the envelope
        # the ramp is linear from 0 and ends exactly where the envelope is
        for r in range(Wr):
            assert jagged_cosine(n * C + r, *cfg) == pytest.approx(r / Wr * lam, abs=1e-15)
    # first warmup ends on the envelope's start (1.0)
    if W1 > 0:
        assert jagged_cosine(W1 - 1, *cfg) == pytest.approx((W1 - 1) / W1)
    if W1 < C:
        assert jagged_cosine(W1, *cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reaches_min_ratio_at_end(cfg):
    T, W1, Wr, C, m = cfg
    last = jagged_cosine(T - 1, *cfg)
    step_decay = (1 - m) * (math.pi / max(1, T - W1)) ** 2  # cosine near its end is quadratic
    assert m <= last <= m + step_decay + 1e-12
    assert _env(1.0, m) == pytest.approx(m)


def test_is_reset_step_convention():
    assert not is_reset_step(0, 100)
    assert not is_reset_step(99, 100)
    assert is_reset_step(100, 100)
    assert not is_reset_step(101, 100)
    assert is_reset_step(900, 100, 1000)
    assert not is_reset_step(1000, 100, 1000)
    assert is_reset_step(1000, 100)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(total=1000, first_warmup=10, restart_warmup=100, cycle_length=100, min_lr_ratio=0.1),
     "restart_warmup=100 must be shorter"),
    (dict(total=1000, first_warmup=10, restart_warmup=0, cycle_length=100, min_lr_ratio=0.1),
     "restart_warmup=0"),
    (dict(total=1000, first_warmup=101, restart_warmup=10, cycle_length=100, min_lr_ratio=0.1),
     "first_warmup=101 exceeds cycle_length=100"),
    (dict(total=1000, first_warmup=10, restart_warmup=10, cycle_length=100, min_lr_ratio=0.0),
     "0 < min_lr_ratio <= 1"),
    (dict(total=1000, first_warmup=10, restart_warmup=10, cycle_length=100, min_lr_ratio=1.5),
     "0 < min_lr_ratio <= 1"),
    (dict(total=1050, first_warmup=10, restart_warmup=10, cycle_length=100, min_lr_ratio=0.1),
     "use total=1000 or 1100"),
    (dict(total=1000, first_warmup=10, restart_warmup=10, cycle_length=0, min_lr_ratio=0.1),
     "cycle_length=0"),
    (dict(total=0, first_warmup=0, restart_warmup=1, cycle_length=10, min_lr_ratio=0.1),
     "total=0"),
    (dict(total=100.0, first_warmup=0, restart_warmup=1, cycle_length=10, min_lr_ratio=0.1),
     "total=100.0"),
])
def test_validate_jagged_errors(kwargs, needle):
    with pytest.raises(ScheduleError) as ei:
        validate_jagged(**kwargs)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg
    with pytest.raises(ValueError):
        jagged_cosine(5, **kwargs)


def test_total_not_multiple_suggests_cycle_lengths():
    with pytest.raises(ScheduleError, match=r"cycle_length dividing 1050 such as 105 or 75"):
        validate_jagged(1050, 10, 10, 100, 0.1)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 100, 0.1) == 0.0
    assert warmup_cosine(5, 10, 100, 0.1) == 0.5
    assert warmup_cosine(10, 10, 100, 0.1) == 1.0
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)  # clamped
    assert warmup_cosine(0, 0, 100, 0.0) == 1.0
    vals = [warmup_cosine(s, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ScheduleError):
        warmup_cosine(0, 200, 100, 0.1)
    with pytest.raises(ScheduleError):
        warmup_cosine(0, 10, 100, -0.1)
    with pytest.raises(ScheduleError):
        warmup_cosine(-1, 10, 100, 0.1)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_whole_run_without_warm_start_is_the_jagged_cosine(cfg):
    from relora_dist.relora.schedule import whole_run_jagged

    total, w1, wr, c, m = cfg
    for t in range(total + 5):
        assert whole_run_jagged(t, total, w1, 0, w1, wr, c, m) == pytest.approx(jagged_cosine(t, total, w1, wr, c, m),
                                                                                abs=1e-12), t


def test_paper_schedule_is_one_envelope_over_the_whole_run():
    """relora.warm_start_schedule=paper: the warm start is the first part of ONE warmup + cosine
    over train.max_steps (no anneal at the switch), the ReLoRA phase ramps back up to that envelope
    after the switch and after each reset, and the LR is 0 exactly at the reset steps; anneal keeps
    the warm start's own complete cosine."""
    from relora_dist.config import load_config
    from relora_dist.relora.schedule import lr_multiplier, reset_due

    def cfg(schedule):
        return load_config(None, ["--train.max_steps=400", "--relora.warm_start_steps=100", "--schedule.warmup_steps=20",
                                  "--relora.cycle_length=100", "--relora.first_warmup=10", "--relora.restart_warmup=5",
                                  "--schedule.min_lr_ratio=0.1", f"--relora.warm_start_schedule={schedule}"])

    paper, anneal = cfg("paper"), cfg("anneal")
    env = [_env(min(max((s - 20) / 380, 0.0), 1.0), 0.1) for s in range(401)]
    mult = [lr_multiplier(paper, s) for s in range(400)]
    assert mult[10] == pytest.approx(0.5) and mult[50] == pytest.approx(env[50])
    assert mult[99] == pytest.approx(env[99]) and mult[99] > 0.85  # the switch comes near the peak
    assert lr_multiplier(anneal, 99) == pytest.approx(0.1, abs=0.01)  # anneal: at min_lr_ratio there
    assert mult[100] == 0.0 and mult[105] == pytest.approx(0.5 * env[110])  # first ReLoRA warmup
    for s in (150, 250, 399):
        assert mult[s] == pytest.approx(env[s])
    resets = [s for s in range(400) if reset_due(paper, s)]
    assert resets == [200, 300] and all(mult[s] == 0.0 for s in resets)
    assert mult[203] == pytest.approx(3 / 5 * env[205])  # restart warmup up to the envelope
    assert all(a <= e + 1e-12 for a, e in zip(mult, env))


@pytest.mark.parametrize("schedule", ["paper", "anneal"])
def test_lr_restarts_true_gives_the_lora_baseline_the_jagged_lr(schedule):
    """relora.lr_restarts=true with resets=false: the LoRA baseline follows ReLoRA's LR exactly
    (restarts to 0 at each cycle boundary) without merging; auto follows relora.resets; false with
    resets keeps the LR on the envelope through the resets."""
    from relora_dist.config import load_config
    from relora_dist.relora.schedule import lr_multiplier, reset_due

    def cfg(*extra):
        return load_config(None, ["--train.max_steps=400", "--relora.warm_start_steps=100", "--schedule.warmup_steps=20",
                                  "--relora.cycle_length=100", "--relora.first_warmup=10", "--relora.restart_warmup=5",
                                  f"--relora.warm_start_schedule={schedule}", *extra])

    relora, lora = cfg(), cfg("--relora.resets=false")
    lora_jagged = cfg("--relora.resets=false", "--relora.lr_restarts=true")
    no_restarts = cfg("--relora.lr_restarts=false")
    steps = range(400)
    assert [lr_multiplier(lora_jagged, s) for s in steps] == [lr_multiplier(relora, s) for s in steps]
    assert not any(reset_due(lora_jagged, s) for s in steps)
    assert [lr_multiplier(no_restarts, s) for s in steps] == [lr_multiplier(lora, s) for s in steps]
    assert lr_multiplier(relora, 200) == 0.0 and lr_multiplier(lora, 200) > 0.3


def test_a_short_run_is_told_phase_lengths_that_fit():
    """`--train.max_steps=20` with the default 100-step warm start is refused, and the one-line error
    gives flags that, added to the same command, make a valid run; for every length from 3 to 400
    the suggested set passes the schedule's own rules, and at 300 it is the default run's."""
    import re

    from relora_dist.config import ConfigError, load_config
    from relora_dist.relora.schedule import check_schedule_config, fitting_phase_lengths

    with pytest.raises(ConfigError) as ei:
        check_schedule_config(load_config(None, ["--train.max_steps=20"]))
    msg = str(ei.value)
    flags = re.findall(r"--relora\.\w+=\d+", msg)
    assert "\n" not in msg and len(flags) == 4, msg
    check_schedule_config(load_config(None, ["--train.max_steps=20", *flags]))
    default = load_config(None, []).relora
    assert fitting_phase_lengths(300) == {k: getattr(default, k) for k in
                                          ("warm_start_steps", "cycle_length", "first_warmup", "restart_warmup")}
    for n in range(3, 401):
        fit = fitting_phase_lengths(n)
        check_schedule_config(load_config(None, [f"--train.max_steps={n}", *(f"--relora.{k}={v}" for k, v in fit.items())]))
    assert fitting_phase_lengths(2) is None


def test_reference_schedule_is_the_reference_repositorys_two_runs():
    """relora.warm_start_schedule=reference, hand-computed (env(p) = 0.1 + 0.45 (1 + cos(pi p))):
    run 1, the warm start, is a cosine over all 400 steps (warmup 20) stopped at the switch (step
    100); run 2, the ReLoRA phase, is a fresh jagged cosine over its own 300 steps (W1 = 10,
    Wr = 5, C = 100), from the peak again: env((t - 10) / 290)."""
    from relora_dist.config import load_config
    from relora_dist.relora.schedule import lr_multiplier, reset_due

    def cfg(schedule, *extra):
        return load_config(None, ["--train.max_steps=400", "--relora.warm_start_steps=100", "--schedule.warmup_steps=20",
                                  "--relora.cycle_length=100", "--relora.first_warmup=10", "--relora.restart_warmup=5",
                                  "--schedule.min_lr_ratio=0.1", f"--relora.warm_start_schedule={schedule}", *extra])

    ref, paper, anneal = cfg("reference"), cfg("paper"), cfg("anneal")
    hand = {10: 0.5,                     # warmup 10 / 20
            50: 0.9862301196726987,      # env((50 - 20) / 380)
            99: 0.907386127349082,       # env(79 / 380): not annealed at the switch
            100: 0.0, 105: 0.5,          # the ReLoRA run's first warmup, 5 / 10 of the PEAK
            110: 1.0,                    # env(0): its cosine starts again from the peak
            200: 0.0,                    # reset step (t = 100)
            203: 0.46919954143779585,    # 3 / 5 * env((100 + 5 - 10) / 290)
            250: 0.574362508863438,      # env(140 / 290)
            399: 0.1000264047475991}     # env(289 / 290)
    for step, want in hand.items():
        assert lr_multiplier(ref, step) == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert [s for s in range(400) if reset_due(ref, s)] == [200, 300]
    # the warm start is paper's, the ReLoRA phase anneal's
    assert all(lr_multiplier(ref, s) == lr_multiplier(paper, s) for s in range(100))
    assert all(lr_multiplier(ref, s) == lr_multiplier(anneal, s) for s in range(100, 400))
    assert lr_multiplier(ref, 110) - lr_multiplier(paper, 110) > 0.1  # paper: env over the whole run, 0.881
    # the LoRA baseline's second run: scheduler "cosine" over the phase, no restarts
    lora = cfg("reference", "--relora.resets=false")
    assert lr_multiplier(lora, 200) == pytest.approx(0.8025341794130721, rel=1e-12)  # env((100 - 10) / 290)
    assert lr_multiplier(lora, 250) == pytest.approx(hand[250], rel=1e-12)


@pytest.mark.parametrize("schedule", ["paper", "reference"])
def test_min_reset_lr_ratio_stops_resets_once_the_lr_is_low(schedule):
    """relora.min_reset_lr_ratio: resets (and their LR restarts) happen only while the LR a restart
    warmup ramps back to is at least that fraction of the peak; the cycles after the last one follow
    the no-restart schedule. The replication table's schedule (400 steps, switch 100, cycle 50,
    warmup 30, restart warmup 10): under paper the envelope after the restart warmups of the resets
    at 150 / 200 / 250 / 300 / 350 is 0.753 / 0.569 / 0.382 / 0.225 / 0.126, so 0.5 keeps two."""
    from relora_dist.config import ConfigError, load_config
    from relora_dist.relora.schedule import check_schedule_config, lr_multiplier, reset_due

    def cfg(*extra):
        return load_config(None, ["--train.max_steps=400", "--relora.warm_start_steps=100", "--schedule.warmup_steps=30",
                                  "--relora.cycle_length=50", "--relora.first_warmup=10", "--relora.restart_warmup=10",
                                  "--schedule.min_lr_ratio=0.1", f"--relora.warm_start_schedule={schedule}", *extra])

    every, floor, lora = cfg(), cfg("--relora.min_reset_lr_ratio=0.5"), cfg("--relora.resets=false")
    steps = range(400)
    assert [s for s in steps if reset_due(every, s)] == [150, 200, 250, 300, 350]
    if schedule == "paper":
        env = {s: _env((s - 30) / 370, 0.1) for s in (160, 210, 260)}
        assert [round(env[s], 3) for s in env] == [0.753, 0.569, 0.382]
        assert [s for s in steps if reset_due(floor, s)] == [150, 200]
        assert lr_multiplier(every, 250) == 0.0 and lr_multiplier(every, 255) == pytest.approx(0.5 * env[260])
        # no LR-0 step and no restart warmup at 250: on the envelope
        assert lr_multiplier(floor, 250) == pytest.approx(_env(220 / 370, 0.1))
        assert lr_multiplier(floor, 255) == pytest.approx(_env(225 / 370, 0.1))
    else:  # the reference's fresh cosine over the 300-step phase: 0.5 falls between the resets at 150 and 200
        ramp = [_env((t + 10 - 10) / 290, 0.1) for t in (50, 100, 150, 200)]
        assert ramp[2] >= 0.5 > ramp[3]
        assert [s for s in steps if reset_due(floor, s)] == [150, 200, 250]
    last = max(s for s in steps if reset_due(floor, s))
    # the same schedule as every-cycle resets up to the last kept reset's cycle, LoRA's after it
    assert [lr_multiplier(floor, s) for s in range(last + 50)] == [lr_multiplier(every, s) for s in range(last + 50)]
    after = range(last + 50, 400)
    if schedule == "paper":
        assert [lr_multiplier(floor, s) for s in after] == [lr_multiplier(lora, s) for s in after]
    assert all(lr_multiplier(floor, s) > 0 for s in after)
    assert not any(reset_due(cfg("--relora.min_reset_lr_ratio=1"), s) for s in steps)
    with pytest.raises(ConfigError, match="relora.min_reset_lr_ratio=1.5"):
        check_schedule_config(cfg("--relora.min_reset_lr_ratio=1.5"))
