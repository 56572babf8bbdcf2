"""Overfitting / too-low eval loss warnings shown in the thread's progress message."""

from __future__ import annotations

from agent.nodes_train import progress_text
from jobs.training import LOW_EVAL_LOSS, training_warnings
from jobs.values import RunSnapshot

TRAIN_FALLING = [(s, 2.0 - s / 100) for s in range(0, 101, 10)]
TRAIN_RISING = [(s, 1.0 + s / 100) for s in range(0, 101, 10)]


def _overfit(ws: list[str]) -> bool:
    return any("overfitting" in w.lower() for w in ws)


def _too_low(ws: list[str]) -> bool:
    return any("0.6-0.7" in w for w in ws)


def test_healthy_curve_in_the_seed_band_has_no_warning():
    evals = [(20, 0.95), (40, 0.80), (60, 0.70), (80, 0.66), (100, 0.65)]
    assert training_warnings(TRAIN_FALLING, evals) == []


def test_eval_rising_while_train_falls_warns_overfitting():
    evals = [(20, 0.9), (40, 0.7), (60, 0.72), (80, 0.76)]
    ws = training_warnings(TRAIN_FALLING, evals)
    assert _overfit(ws) and not _too_low(ws)
    # a single uptick is noise, not a trend
    assert not _overfit(training_warnings(TRAIN_FALLING, evals[:3]))
    # eval back down at the latest point: no longer warned
    assert not _overfit(training_warnings(TRAIN_FALLING, evals + [(100, 0.71)]))


def test_eval_rising_with_train_rising_is_not_overfitting():
    evals = [(20, 0.9), (40, 0.7), (60, 0.72), (80, 0.76)]
    assert not _overfit(training_warnings(TRAIN_RISING, evals))


def test_eval_far_below_the_seed_band_warns():
    evals = [(20, 0.9), (40, 0.5), (60, LOW_EVAL_LOSS / 2)]
    ws = training_warnings(TRAIN_FALLING, evals)
    assert _too_low(ws) and not _overfit(ws)
    assert not _too_low(training_warnings(TRAIN_FALLING, [(20, 0.9), (40, 0.55)]))


def test_warnings_are_shown_in_the_progress_message():
    evals = [(20, 0.9), (40, 0.7), (60, 0.72), (80, 0.76)]
    snap = RunSnapshot(run_id=7, state="running", step=80, max_steps=100, train_loss=TRAIN_FALLING[:9],
                       eval_loss=evals, best_step=40, best_eval_loss=0.7, eta_s=60.0,
                       warnings=training_warnings(TRAIN_FALLING[:9], evals))
    text = progress_text(snap)
    assert ":warning: Possible overfitting" in text
    assert "best 0.7000 @ step 40" in text and "ETA 1 min" in text
    quiet = progress_text(RunSnapshot(run_id=7, state="running", eval_loss=[(20, 0.9)]))
    assert ":warning:" not in quiet
