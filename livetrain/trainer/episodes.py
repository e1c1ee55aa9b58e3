"""One alert per problem: the health rules' findings grouped into episodes.

A rule reports its condition at every log it holds at. An episode is one stretch of a
condition, keyed by (code, layer): it opens at the first log, follows the condition
while it holds (last step, how many logs, its worst value), and closes when the
condition has been gone for RESOLVE_AFTER_LOGS logs in a row: "resolved at step N", N
being the first log it no longer held at. A condition that flickers off for a log or
two stays one episode. A rollback closes every open episode as "rolled_back": what is
still wrong on the new branch opens afresh.

This module is pure bookkeeping (no torch, no SQL); the Logbook writes what it returns:
an `events` row when an episode opens, and the episode's `alerts` row at every change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from livetrain.trainer.diagnostics import Finding

RESOLVE_AFTER_LOGS = 3  # logs in a row without the condition that end its episode

Key = tuple[str, str | None]


@dataclass(frozen=True)
class Episode:
    """One stretch of a condition, as the `alerts` table holds it."""

    alert_id: str
    finding: Finding  # the latest log's wording, recommendation and fix
    first_step: int
    last_step: int
    logs: int
    worst_value: float | None
    status: str = "open"  # open, resolved, rolled_back
    resolved_step: int | None = None

    @property
    def code(self) -> str:
        return self.finding.code

    @property
    def layer(self) -> str | None:
        return self.finding.layer


@dataclass(frozen=True)
class AlertChange:
    """What happened to an episode at a log: opened, held, resolved or rolled_back."""

    kind: str
    episode: Episode

    @property
    def code(self) -> str:
        return self.episode.code

    @property
    def layer(self) -> str | None:
        return self.episode.layer

    @property
    def level(self) -> str:
        return self.episode.finding.level


def _worse(finding: Finding, worst: float | None) -> float | None:
    value = finding.value
    if value is None or worst is None:
        return value if worst is None else worst
    return max(value, worst) if finding.higher_is_worse else min(value, worst)


class EpisodeBook:
    """The open episodes of one run and the logs since each last held."""

    def __init__(self) -> None:
        self._open: dict[Key, Episode] = {}
        self._absent: dict[Key, tuple[int, int]] = {}  # key -> (logs absent, first such step)

    @property
    def open(self) -> tuple[Episode, ...]:
        return tuple(self._open.values())

    def update(self, step: int, findings: list[Finding],
               held: set[Key] | frozenset[Key] = frozenset()) -> list[AlertChange]:
        """Fold one log's findings into the episodes; the changes, in findings' order,
        then the episodes this log resolved. `held`: the episodes this log could not
        judge (its rules did not run), which stay open without counting as absent."""
        changes = []
        current = {}
        for finding in findings:
            key = (finding.code, finding.layer)
            current[key] = finding
            self._absent.pop(key, None)
            was = self._open.get(key)
            if was is None:
                episode = Episode(uuid.uuid4().hex, finding, step, step, 1, finding.value)
                changes.append(AlertChange("opened", episode))
            else:
                episode = replace(was, finding=finding, last_step=step, logs=was.logs + 1,
                                  worst_value=_worse(finding, was.worst_value))
                changes.append(AlertChange("held", episode))
            self._open[key] = episode
        for key in [k for k in self._open if k not in current and k not in held]:
            absent, since = self._absent.get(key, (0, step))
            if absent + 1 < RESOLVE_AFTER_LOGS:
                self._absent[key] = (absent + 1, since)
                continue
            episode = replace(self._open.pop(key), status="resolved", resolved_step=since)
            self._absent.pop(key, None)
            changes.append(AlertChange("resolved", episode))
        return changes

    def roll_back(self, step: int) -> list[AlertChange]:
        """The run went back to `step`: every open episode ends there."""
        changes = [AlertChange("rolled_back", replace(e, status="rolled_back", resolved_step=step))
                   for e in self._open.values()]
        self._open.clear()
        self._absent.clear()
        return changes
