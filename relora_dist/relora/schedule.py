"""Learning-rate multipliers (lr = lr_max * multiplier) for the warm start and the ReLoRA phase.

``jagged_cosine`` is the reference's "cosine_restarts" schedule (github Guitaricet/relora,
``training_utils._get_cosine_schedule_with_multiple_warmups_lambda`` with adjust_step = 0; ReLoRA
paper arXiv 2307.05695 §3 "jagged cosine"): one cosine envelope over the whole ReLoRA phase, a first
linear warmup, and after every reset a short linear re-warm from 0 back up to the envelope.  The
re-warm matters: the Adam ``step`` counter is not reset with the pruned moments, so the first update
after a reset is ~3*sign(g)*lr; the paper's ablation diverges without it.

Reset-step convention (the reference's loop order): the optimizer step with phase index t (0-based
steps since the ReLoRA phase began) runs at ``lr_max * jagged_cosine(t)``; the multiplier is exactly
0 at every t with ``t % C == 0 and t >= C``; the merge + re-init + optimizer prune happens right after
that LR-0 step (see ``is_reset_step``) and step t+1 begins the restart warmup.  (The reference checks
``(update_step - start) % C == 1`` after incrementing update_step, i.e. the same steps.)  With T
steps (t = 0..T-1) there are T/C - 1 resets, at t = C, 2C, ..., T - C.

Three whole-run shapes, relora.warm_start_schedule (``lr_multiplier``): ``paper`` (one envelope over
the whole run, the ReLoRA phase re-warming up to it: whole_run_jagged), ``reference`` (the reference
repository's two runs as its README says the paper's were run: the warm start cut from a cosine over
the whole run, then a fresh jagged cosine over the ReLoRA phase alone: reference_two_run) and
``anneal`` (the warm start's own complete cosine, then the same fresh jagged cosine).

``lr_multiplier`` and ``reset_due`` apply these to a run's config (global step -> multiplier, and
whether a reset follows the step); the trainer calls nothing else.
"""

from __future__ import annotations

import math
import numbers

from relora_dist.config import WARM_START_SCHEDULES, Config, ConfigError

__all__ = ["ScheduleError", "WARM_START_SCHEDULES", "warmup_cosine", "jagged_cosine", "whole_run_jagged",
           "reference_two_run", "validate_jagged",
           "check_min_lr_ratio", "check_schedule_config", "is_reset_step", "fitting_phase_lengths"]


# WARM_START_SCHEDULES: relora.warm_start_schedule's words (config.py; see lr_multiplier).


class ScheduleError(ValueError):
    """An invalid schedule setting; the message names the problem and valid values on one line."""


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ScheduleError(f"{name}={v!r} must be an integer >= {lo}")
    return int(v)


def _envelope(progress: float, min_lr_ratio: float) -> float:
    """m + (1 - m) * 0.5 * (1 + cos(pi * progress)); progress clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, warmup: int, total: int, min_lr_ratio: float) -> float:
    """Linear warmup ``step / warmup`` (so step 0 -> 0.0, step warmup -> 1.0), then cosine from 1 to
    ``min_lr_ratio`` at ``step == total``; constant ``min_lr_ratio`` beyond ``total``.
    ``warmup == 0`` starts directly on the cosine (step 0 -> 1.0)."""
    step = _int("step", step, 0)
    total = _int("total", total, 1)
    warmup = _int("warmup", warmup, 0)
    if warmup > total:
        raise ScheduleError(f"warmup={warmup} exceeds total={total}: use 0 <= warmup <= {total}")
    if not (isinstance(min_lr_ratio, numbers.Real) and 0.0 <= min_lr_ratio <= 1.0):  # 0 allowed here
        raise ScheduleError(f"min_lr_ratio={min_lr_ratio!r} is invalid: use 0 <= min_lr_ratio <= 1")
    if step < warmup:
        return step / warmup
    return _envelope((step - warmup) / max(1, total - warmup), float(min_lr_ratio))


def _divisors_near(total: int, c: int, k: int = 2) -> list[int]:
    divs: set[int] = set()
    i = 1
    while i * i <= total:
        if total % i == 0:
            divs.update((i, total // i))
        i += 1
    return sorted(divs, key=lambda d: (abs(d - c), d))[:k]


def validate_jagged(total: int, first_warmup: int, restart_warmup: int, cycle_length: int,
                    min_lr_ratio: float, *, keys: dict[str, str] | None = None, offset: int = 0) -> None:
    """Raise ScheduleError (one line, naming valid values) unless: cycle_length >= 1;
    total is a positive multiple of cycle_length; 0 <= first_warmup <= cycle_length;
    1 <= restart_warmup < cycle_length; 0 < min_lr_ratio <= 1 (the reference's asserts, plus
    restart_warmup >= 1 so the LR really is 0 at each reset step).

    `keys` renames the arguments in the messages (check_schedule_config passes config keys, so one
    set of rules serves both callers); with keys, suggested values are written as `key=value` and
    the totals as keys["total_fix"] = the suggested phase length + `offset` (the steps before it)."""
    k = {"total": "total", "total_fix": "total", "first_warmup": "first_warmup",
         "restart_warmup": "restart_warmup", "cycle_length": "cycle_length", "min_lr_ratio": "min_lr_ratio",
         **(keys or {})}
    cl, fw, rw = k["cycle_length"], k["first_warmup"], k["restart_warmup"]
    c = _int(cl, cycle_length, 1)
    t = _int(k["total"], total, 1)
    w1 = _int(fw, first_warmup, 0)
    wr = _int(rw, restart_warmup, 0)
    if t % c != 0:
        lower, upper = (t // c) * c, (t // c + 1) * c
        totals = " or ".join(str(x + offset) for x in (lower, upper) if x > 0)
        cycles = (f"{cl}=" if keys else "") + " or ".join(str(d) for d in _divisors_near(t, c))
        raise ScheduleError(
            f"ReLoRA phase length {k['total']}={t} is not a multiple of {cl}={c}: "
            f"use {k['total_fix']}={totals}, or a {cl} dividing {t} such as {cycles}")
    if w1 > c:
        raise ScheduleError(
            f"{fw}={w1} exceeds {cl}={c} (the first reset would come before the warmup ends): use {fw} <= {c}")
    if wr < 1:
        raise ScheduleError(f"{rw}={wr} must be >= 1 (the LR must be 0 at each reset step): use e.g. "
                            f"{rw}={max(1, min(5, c - 1))}")
    if wr >= c:
        raise ScheduleError(f"{rw}={wr} must be shorter than {cl}={c}: use 1 <= {rw} <= {c - 1}")
    check_min_lr_ratio(min_lr_ratio, k["min_lr_ratio"])


def check_min_lr_ratio(value: float, key: str = "min_lr_ratio") -> None:
    """Both phases' cosine envelopes end at min_lr_ratio x the peak: 0 < min_lr_ratio <= 1."""
    if not (isinstance(value, numbers.Real) and 0.0 < value <= 1.0):
        raise ScheduleError(f"{key}={value!r} is invalid: use 0 < {key} <= 1 (e.g. 0.1)")


def check_schedule_config(cfg) -> None:
    """schedule.* and, when the ReLoRA phase resets, its jagged cosine, named by config key: the same
    rules jagged_cosine enforces at run time (validate_jagged), raised as ConfigError."""
    r, t = cfg.relora, cfg.train
    if cfg.schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be >= 0")
    if not (isinstance(r.min_reset_lr_ratio, numbers.Real) and 0.0 <= r.min_reset_lr_ratio <= 1.0):
        raise ConfigError(f"relora.min_reset_lr_ratio={r.min_reset_lr_ratio!r} is invalid: use 0 <= it <= 1 "
                          "(0 = a reset every cycle; e.g. 0.5 stops resetting once the LR is below half its peak)")
    if r.enabled and r.warm_start_steps >= t.max_steps:
        raise ConfigError(f"relora.warm_start_steps={r.warm_start_steps} leaves no ReLoRA steps in "
                          f"train.max_steps={t.max_steps}; {_fitting_hint(t.max_steps, r.resets)}")
    try:
        check_min_lr_ratio(cfg.schedule.min_lr_ratio, "schedule.min_lr_ratio")
        if r.enabled and r.resets:
            keys = {"total": f"(train.max_steps={t.max_steps} - relora.warm_start_steps={r.warm_start_steps})",
                    "total_fix": "train.max_steps", "first_warmup": "relora.first_warmup",
                    "restart_warmup": "relora.restart_warmup", "cycle_length": "relora.cycle_length",
                    "min_lr_ratio": "schedule.min_lr_ratio"}
            validate_jagged(cfg.relora_steps, r.first_warmup, r.restart_warmup, r.cycle_length,
                            cfg.schedule.min_lr_ratio, keys=keys, offset=r.warm_start_steps)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None


def fitting_phase_lengths(max_steps: int) -> dict[str, int] | None:
    """ReLoRA phase lengths that fit a run of `max_steps` in the default run's proportions (a third
    warm start, then four cycles, warmups a fifth and a tenth of a cycle: 300 -> 100, 50, 10, 5),
    so that a short first try (`--train.max_steps=20`) is told a working set. None below 3 steps."""
    if max_steps < 3:
        return None
    cycles = 4 if max_steps >= 12 else 1
    relora = (max_steps - max_steps // 3) // cycles * cycles
    c = relora // cycles
    return {"warm_start_steps": max_steps - relora, "cycle_length": c, "first_warmup": max(1, c // 5),
            "restart_warmup": max(1, c // 10)}


def _fitting_hint(max_steps: int, resets: bool) -> str:
    fit = fitting_phase_lengths(max_steps)
    if fit is None:
        return "use train.max_steps >= 3, or relora.enabled=false for full-rank steps only"
    keys = fit if resets else {"warm_start_steps": fit["warm_start_steps"]}
    flags = " ".join(f"--relora.{k}={v}" for k, v in keys.items())
    return f"for a {max_steps}-step run pass {flags}, or raise train.max_steps"


def jagged_cosine(t: int, total: int, first_warmup: int, restart_warmup: int, cycle_length: int,
                  min_lr_ratio: float) -> float:
    """Multiplier for phase step t (T = total, W1 = first_warmup, Wr = restart_warmup,
    C = cycle_length, m = min_lr_ratio, env(p) = m + (1-m) * (1 + cos(pi p)) / 2):

    * t < W1: t / W1
    * r = t mod C, n = t // C; if r < Wr and t >= C: (r / Wr) * env((n*C + Wr - W1) / (T - W1))
    * otherwise: env((t - W1) / (T - W1))

    (denominators max(1, .); envelope progress clamped to [0, 1], which only matters for t > T).
    Exactly 0 at every reset step (t % C == 0, t >= C)."""
    validate_jagged(total, first_warmup, restart_warmup, cycle_length, min_lr_ratio)
    t = _int("t", t, 0)
    m = float(min_lr_ratio)
    if t < first_warmup:
        return t / max(1, first_warmup)
    span = max(1, total - first_warmup)
    r, n = t % cycle_length, t // cycle_length
    if r < restart_warmup and t >= cycle_length:
        end_of_warmup = _envelope((n * cycle_length + restart_warmup - first_warmup) / span, m)
        return r / restart_warmup * end_of_warmup
    return _envelope((t - first_warmup) / span, m)


def whole_run_jagged(step: int, total_steps: int, warmup: int, switch: int, first_warmup: int,
                     restart_warmup: int, cycle_length: int, min_lr_ratio: float, resets: bool = True) -> float:
    """The paper's schedule: ONE linear warmup + cosine envelope over the whole run,
    env(s) = m + (1-m) * (1 + cos(pi (s - warmup) / (total_steps - warmup))) / 2, that the full-rank
    warm start (steps < switch) follows as is; the ReLoRA phase (t = step - switch) ramps up to it
    over its first warmup and, after every reset, over the restart warmup:

    * step < switch: step / warmup below warmup, else env(step)
    * t < W1: (t / W1) * env(switch + W1)
    * r = t mod C, n = t // C; if r < Wr and t >= C (resets only): (r / Wr) * env(switch + n*C + Wr)
    * otherwise: env(step)

    So the warm start ends near the peak LR (the paper warm-starts from a checkpoint taken
    mid-schedule), not annealed. With switch = 0 and warmup = W1 this is jagged_cosine exactly;
    the LR is exactly 0 at every reset step."""
    step = _int("step", step, 0)
    m = float(min_lr_ratio)

    def env(s: int) -> float:
        return _envelope((s - warmup) / max(1, total_steps - warmup), m)

    if step < switch:
        return step / warmup if step < warmup else env(step)
    t = step - switch
    if t < first_warmup:
        return t / first_warmup * env(switch + first_warmup)
    r, n = t % cycle_length, t // cycle_length
    if resets and r < restart_warmup and t >= cycle_length:
        return r / restart_warmup * env(switch + n * cycle_length + restart_warmup)
    return env(step)


def is_reset_step(t: int, cycle_length: int, total: int | None = None) -> bool:
    """True when the merge + re-init + optimizer prune follows the optimizer step with phase index t,
    i.e. the step taken at LR 0: ``t % cycle_length == 0 and t >= cycle_length`` (and ``t < total``
    when total is given; steps run t = 0..total-1)."""
    t = _int("t", t, 0)
    c = _int("cycle_length", cycle_length, 1)
    if t < c or t % c != 0:
        return False
    return total is None or t < total


def reference_two_run(step: int, total_steps: int, warmup: int, switch: int, first_warmup: int,
                      restart_warmup: int, cycle_length: int, min_lr_ratio: float, restarts: bool = True) -> float:
    """The reference repository's recipe (github Guitaricet/relora, README "Reproducibility note":
    the paper's warm-start runs were given the full num_training_steps and stopped at the switch;
    the ReLoRA run loads the weights with --warmed_up_model and its training_state.json, so its
    scheduler runs over num_training_steps - update_step, torchrun_main.py), as two runs:

    * step < switch (warm-start run, scheduler "cosine"): warmup_cosine(step, warmup, total_steps, m),
      i.e. step / warmup, then m + (1-m) * (1 + cos(pi (step - warmup) / (total_steps - warmup))) / 2
    * t = step - switch, T = total_steps - switch (ReLoRA run, scheduler "cosine_restarts", a fresh
      scheduler from its step 0): jagged_cosine(t, T, W1, Wr, C, m) with restarts, else
      warmup_cosine(t, W1, T, m) (the reference's LoRA baseline: scheduler "cosine").

    Against ``paper`` (whole_run_jagged): the same warm start, but the ReLoRA phase's cosine starts
    again from the peak over T instead of continuing the whole run's envelope, so after the first
    warmup it runs above paper's until both reach min_lr_ratio at the end. Against ``anneal``: the
    same ReLoRA phase, but the warm start is not annealed (anneal decays to min_lr_ratio inside the
    warm start, the reference README's other option, "Providing only the number of training steps").
    Largest |difference| in the multiplier, all steps of the bundled presets (60m/130m/350m_paper,
    default): reference - paper 0.150 / 0.194 / 0.216 / 0.306 (at the end of the first ReLoRA
    warmup: 1.0 against 0.938 / 0.903 / 0.882 / 0.789); reference - anneal 0.847 / 0.817 / 0.792 /
    0.741 (last warm-start step: 0.946 / 0.914 / 0.887 / 0.835 against about min_lr_ratio)."""
    step = _int("step", step, 0)
    if step < switch:
        return warmup_cosine(step, warmup, total_steps, min_lr_ratio)
    return _relora_phase(step - switch, total_steps - switch, first_warmup, restart_warmup, cycle_length,
                         min_lr_ratio, restarts)


def _relora_phase(t: int, total: int, first_warmup: int, restart_warmup: int, cycle_length: int,
                  min_lr_ratio: float, restarts: bool) -> float:
    """A fresh schedule over the ReLoRA phase alone: jagged cosine with restarts, else warmup+cosine."""
    if not restarts:
        return warmup_cosine(t, min(first_warmup, total), total, min_lr_ratio)
    return jagged_cosine(t, total, first_warmup, restart_warmup, cycle_length, min_lr_ratio)


def last_reset(cfg: Config) -> int:
    """Phase index t of the last reset relora.min_reset_lr_ratio allows: the largest n * C (n >= 1,
    n * C < the phase's steps) whose restart warmup ramps back to at least that fraction of the
    peak, i.e. the no-cutoff multiplier at phase step n * C + Wr (the envelope there, which does not
    rise after the first warmup, so the first reset below the floor ends the search). 0 = no reset
    allowed; the phase's length when there is no floor."""
    r = cfg.relora
    total = cfg.relora_steps
    if r.min_reset_lr_ratio <= 0:
        return total
    last, t = 0, r.cycle_length
    while t < total and _multiplier(cfg, r.warm_start_steps + t + r.restart_warmup, True) >= r.min_reset_lr_ratio:
        last, t = t, t + r.cycle_length
    return last


def lr_multiplier(cfg: Config, step: int) -> float:
    """LR multiplier for global step `step` (0-based), by relora.warm_start_schedule. paper: one
    warmup+cosine envelope over the whole run, the ReLoRA phase ramping back up to it after the
    switch and after every reset (whole_run_jagged). reference: the warm start as paper's, then a
    fresh jagged cosine over the ReLoRA phase alone (reference_two_run). anneal: a complete
    warmup+cosine inside the warm start, then the same fresh jagged cosine. Without restarts
    (relora.resets=false, the LoRA baseline) reference and anneal use a plain warmup+cosine over the
    ReLoRA phase."""
    r = cfg.relora
    restarts = r.resets if r.lr_restarts == "auto" else r.lr_restarts == "true"
    if restarts and r.enabled and r.min_reset_lr_ratio > 0:
        # past the last allowed reset's cycle no restart comes (relora.min_reset_lr_ratio)
        restarts = step - r.warm_start_steps < last_reset(cfg) + r.cycle_length
    return _multiplier(cfg, step, restarts)


def _multiplier(cfg: Config, step: int, restarts: bool) -> float:
    r, s = cfg.relora, cfg.schedule
    # Warmups longer than their phase are clamped to it, so a short debug run (--train.max_steps=4)
    # needs no other overrides.
    if not r.enabled:
        total = cfg.train.max_steps
        return warmup_cosine(step, min(s.warmup_steps, total), total, s.min_lr_ratio)
    switch = r.warm_start_steps
    if r.warm_start_schedule == "paper":
        warmup = min(s.warmup_steps, switch) if switch else min(r.first_warmup, cfg.relora_steps)
        return whole_run_jagged(step, cfg.train.max_steps, warmup, switch, min(r.first_warmup, cfg.relora_steps),
                                r.restart_warmup, r.cycle_length, s.min_lr_ratio, restarts)
    if r.warm_start_schedule == "reference":
        return reference_two_run(step, cfg.train.max_steps, min(s.warmup_steps, switch), switch, r.first_warmup,
                                 r.restart_warmup, r.cycle_length, s.min_lr_ratio, restarts)
    if step < switch:
        return warmup_cosine(step, min(s.warmup_steps, switch), switch, s.min_lr_ratio)
    return _relora_phase(step - switch, cfg.relora_steps, r.first_warmup, r.restart_warmup, r.cycle_length,
                         s.min_lr_ratio, restarts)


def reset_due(cfg: Config, step: int) -> bool:
    """Whether a reset follows the optimizer step `step`: the step taken at LR 0 (reference loop
    order: step at LR 0, then merge + re-init + prune, then the restart warmup)."""
    r = cfg.relora
    if not (r.enabled and r.resets) or step < r.warm_start_steps:
        return False
    return is_reset_step(step - r.warm_start_steps, r.cycle_length, min(cfg.relora_steps, last_reset(cfg) + 1))
