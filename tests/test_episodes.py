"""One alert per problem (livetrain.trainer.episodes): a condition reported at log after log
is one episode that opens once, follows the condition, and resolves when the condition has
been gone for RESOLVE_AFTER_LOGS logs; a rollback ends every open episode.

Mostly the EpisodeBook on its own, fed findings by hand; then once through the Diagnostician.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from livetrain.trainer.diagnostician import Diagnostician
from livetrain.trainer.diagnostics import (
    MIN_PERSIST_LOGS,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_PEAK,
    Finding,
    LayerRecord,
    StepRecord,
)
from livetrain.trainer.episodes import RESOLVE_AFTER_LOGS, AlertChange, EpisodeBook

EVERY = 50


def finding(value: float | None = 0.05, code: str = "update_ratio_high",
            layer: str | None = "features.4", higher_is_worse: bool = True) -> Finding:
    return Finding(code, "warning", f"ratio {value}", "lower the lr", {"learning_rate": 1e-5},
                   layer, "update:parameter ratio", value, higher_is_worse)


def feed(book: EpisodeBook, logs: list[list[Finding]],
         first: int = 1) -> list[tuple[int, AlertChange]]:
    """Log i (step EVERY x i, from `first`) reports logs[i - first]; every change, with its
    step."""
    return [(EVERY * i, change) for i, findings in enumerate(logs, first)
            for change in book.update(EVERY * i, findings)]


def kinds(changes: list[tuple[int, AlertChange]]) -> list[tuple[int, str]]:
    return [(step, c.kind) for step, c in changes]


@pytest.mark.parametrize("higher_is_worse", [True, False])
def test_a_condition_held_for_100_logs_is_one_episode(higher_is_worse: bool) -> None:
    rng = random.Random(0)
    values = [rng.uniform(0.02, 0.08) for _ in range(100)]
    book = EpisodeBook()
    changes = feed(book, [[finding(v, higher_is_worse=higher_is_worse)] for v in values])
    assert [c.kind for _, c in changes] == ["opened"] + ["held"] * 99
    assert len({c.episode.alert_id for _, c in changes}) == 1
    episode = changes[-1][1].episode
    assert (episode.first_step, episode.last_step, episode.logs) == (EVERY, 100 * EVERY, 100)
    assert episode.worst_value == (max(values) if higher_is_worse else min(values))
    assert episode.finding.value == values[-1]  # the latest log's wording
    assert (episode.status, episode.resolved_step) == ("open", None)
    assert book.open == (episode,)


def test_the_worst_value_follows_the_episode() -> None:
    book = EpisodeBook()
    changes = feed(book, [[finding(v)] for v in (0.03, 0.09, 0.04)])
    assert [c.episode.worst_value for _, c in changes] == [0.03, 0.09, 0.09]
    changes = feed(EpisodeBook(), [[finding(v, higher_is_worse=False)] for v in (3e-5, 1e-6, 5e-5)])
    assert [c.episode.worst_value for _, c in changes] == [3e-5, 1e-6, 1e-6]


def test_a_finding_without_a_value_keeps_the_worst_known() -> None:
    changes = feed(EpisodeBook(), [[finding(None)], [finding(0.05)], [finding(None)]])
    assert [c.episode.worst_value for _, c in changes] == [None, 0.05, 0.05]


def test_flicker_stays_one_episode() -> None:
    """Absent for 1, then 2 logs (fewer than RESOLVE_AFTER_LOGS): the same episode goes on,
    counting only the logs it held at."""
    assert RESOLVE_AFTER_LOGS > 2
    f = [finding()]
    changes = feed(EpisodeBook(), [f, f, [], f, [], [], f])
    assert kinds(changes) == [(50, "opened"), (100, "held"), (200, "held"), (350, "held")]
    episode = changes[-1][1].episode
    assert (episode.first_step, episode.last_step, episode.logs) == (50, 350, 4)
    assert len({c.episode.alert_id for _, c in changes}) == 1


def test_absence_for_resolve_after_logs_resolves_at_the_first_absent_step() -> None:
    f = [finding()]
    book = EpisodeBook()
    changes = feed(book, [f, f, f] + [[]] * RESOLVE_AFTER_LOGS)
    resolved_at = (3 + RESOLVE_AFTER_LOGS) * EVERY  # the last absent log
    assert kinds(changes) == [(50, "opened"), (100, "held"), (150, "held"),
                              (resolved_at, "resolved")]
    episode = changes[-1][1].episode
    assert (episode.status, episode.resolved_step) == ("resolved", 4 * EVERY)
    assert (episode.first_step, episode.last_step, episode.logs) == (50, 150, 3)
    assert book.open == ()


def test_one_log_short_of_resolving_the_episode_goes_on() -> None:
    f = [finding()]
    changes = feed(EpisodeBook(), [f] + [[]] * (RESOLVE_AFTER_LOGS - 1) + [f])
    assert [c.kind for _, c in changes] == ["opened", "held"]


def test_reappearing_after_resolution_opens_a_new_episode() -> None:
    f = [finding()]
    changes = feed(EpisodeBook(), [f, f] + [[]] * RESOLVE_AFTER_LOGS + [f, f])
    assert [c.kind for _, c in changes] == ["opened", "held", "resolved", "opened", "held"]
    first, second = changes[2][1].episode, changes[3][1].episode
    assert first.alert_id != second.alert_id
    again = 3 + RESOLVE_AFTER_LOGS
    assert (second.first_step, second.logs, second.status) == (again * EVERY, 1, "open")
    assert changes[-1][1].episode.alert_id == second.alert_id


def test_conditions_are_keyed_by_code_and_layer() -> None:
    a = finding(layer="features.0")
    b = finding(layer="features.4")
    c = finding(code="update_ratio_low", layer="features.4", higher_is_worse=False)
    d = finding(code="loss_rising", layer=None)
    changes = feed(EpisodeBook(), [[a, b, c, d], [b, d]] + [[b]] * RESOLVE_AFTER_LOGS)
    opened = [(ch.code, ch.layer) for _, ch in changes if ch.kind == "opened"]
    assert opened == [("update_ratio_high", "features.0"), ("update_ratio_high", "features.4"),
                      ("update_ratio_low", "features.4"), ("loss_rising", None)]
    resolved = [(step, ch.code, ch.layer) for step, ch in changes if ch.kind == "resolved"]
    assert resolved == [(150 + (RESOLVE_AFTER_LOGS - 2) * EVERY, "update_ratio_high", "features.0"),
                        (150 + (RESOLVE_AFTER_LOGS - 2) * EVERY, "update_ratio_low", "features.4"),
                        (200 + (RESOLVE_AFTER_LOGS - 2) * EVERY, "loss_rising", None)]


def test_a_log_lists_its_findings_then_what_it_resolved() -> None:
    a, b = finding(layer="features.0"), finding(layer="features.4")
    changes = feed(EpisodeBook(), [[a]] + [[b]] * RESOLVE_AFTER_LOGS)
    last = [(c.kind, c.layer) for step, c in changes if step == (1 + RESOLVE_AFTER_LOGS) * EVERY]
    assert last == [("held", "features.4"), ("resolved", "features.0")]


def test_a_rollback_ends_every_open_episode() -> None:
    a, b = finding(layer="features.0"), finding(code="loss_rising", layer=None)
    book = EpisodeBook()
    before = feed(book, [[a, b], [a, b], [a]])  # b absent at the last log: still open
    ids = {c.layer: c.episode.alert_id for _, c in before}
    changes = book.roll_back(75)
    assert sorted((c.kind, c.code, c.episode.resolved_step, c.episode.status)
                  for c in changes) == [("rolled_back", "loss_rising", 75, "rolled_back"),
                                        ("rolled_back", "update_ratio_high", 75, "rolled_back")]
    assert {c.layer: c.episode.alert_id for c in changes} == ids
    assert book.open == ()
    # what still holds on the new branch opens afresh
    after = feed(book, [[a]] + [[]] * (RESOLVE_AFTER_LOGS - 1), first=2)
    assert [c.kind for _, c in after] == ["opened"]
    assert after[0][1].episode.alert_id != ids["features.0"]
    assert [c.kind for c in book.roll_back(50)] == ["rolled_back"]
    assert book.roll_back(50) == []  # nothing left open


# --- through the Diagnostician ---------------------------------------------------------------


def record(step: int, ratio: float) -> StepRecord:
    layer = LayerRecord("features.4", 0.5, 1.0, 0.4, 0.1, 1.0, ratio, True)
    return StepRecord(step, 1.0, None, 3e-4, "Adam", 0.0, 50, (layer,), 0.5, None)


def test_the_diagnostician_keeps_a_long_condition_in_one_episode() -> None:
    """Update ratios too high for 100 logs, then back in the band: one alert, opened at the
    log the rule first holds (MIN_PERSIST_LOGS: far out, UPDATE_RATIO_PEAK beyond the limit),
    resolved after RESOLVE_AFTER_LOGS healthy logs, with the worst ratio seen."""
    rng = random.Random(1)
    far = math.log10(UPDATE_RATIO_HIGH * UPDATE_RATIO_PEAK)  # 0.15 to 0.47
    ratios = [10 ** rng.uniform(far, far + 0.5) for _ in range(100)]
    doctor = Diagnostician(10)
    changes = [(i * EVERY, c) for i, r in enumerate(ratios + [1e-3] * RESOLVE_AFTER_LOGS, 1)
               for c in doctor.observe(record(i * EVERY, r))]
    assert [c.kind for _, c in changes] == ["opened"] + ["held"] * (100 - MIN_PERSIST_LOGS) + [
        "resolved"]
    episode = changes[-1][1].episode
    assert episode.first_step == MIN_PERSIST_LOGS * EVERY
    assert (episode.last_step, episode.resolved_step) == (100 * EVERY, 101 * EVERY)
    assert episode.logs == 100 - MIN_PERSIST_LOGS + 1
    assert episode.worst_value == max(ratios[MIN_PERSIST_LOGS - 1:])
    assert math.isclose(episode.finding.value or 0, ratios[-1])


def test_episodes_are_frozen() -> None:
    [(_, change)] = feed(EpisodeBook(), [[finding()]])
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.episode.logs = 2  # type: ignore[misc]
