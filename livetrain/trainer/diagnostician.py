"""The Diagnostician: a run's recent history, every health rule at each log, one alert
per problem.

The rules (livetrain.trainer.diagnostics) say what holds at a log; the episodes
(livetrain.trainer.episodes) turn that into alerts that open, are held and resolve.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

from livetrain.trainer.diagnostics import (
    BLOW_UP_MARGIN,
    HISTORY_LOGS,
    LAYER_RULES,
    RULES,
    Finding,
    RunFacts,
    StepRecord,
    sig,
)
from livetrain.trainer.episodes import AlertChange, EpisodeBook, Key


class Diagnostician:
    """Keeps the recent history, runs every rule at each record, keeps the episodes.

    A record whose step is not after the previous one follows a rollback: the abandoned
    records (steps >= the new one) are dropped and every open episode ends as rolled back,
    so what is still wrong on the new branch opens afresh.

    The layer rules read their own history, of the records that measured the layers
    (livetrain.trainer.cadence), and run only at those: at a log that did not measure
    them, what they found last is held, neither renewed nor resolved.
    """

    def __init__(self, num_classes: int | None) -> None:
        """`num_classes` None: not a classifier (or not yet known); the rules that compare
        with chance level stay silent."""
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.facts = RunFacts(num_classes or 0)
        self._history: deque[StepRecord] = deque(maxlen=HISTORY_LOGS)
        self._layered: deque[StepRecord] = deque(maxlen=HISTORY_LOGS)  # measured ones
        self._layer_keys: set[Key] = set()  # what the layer rules have found
        self.episodes = EpisodeBook()
        self._ceiling = math.inf  # the lowest lr this run has blown up at

    def note_blow_up(self, learning_rate: float) -> None:
        """The run went non-finite at this lr: never suggest going back to it."""
        self._ceiling = min(self._ceiling, learning_rate)

    def _within_ceiling(self, finding: Finding, current_lr: float) -> Finding:
        lr = (finding.fix or {}).get("learning_rate")
        if not isinstance(lr, float | int) or lr < self._ceiling:
            return finding
        safe = float(f"{self._ceiling * BLOW_UP_MARGIN:.1g}")
        note = f" (not above {sig(safe)}: lr {sig(self._ceiling)} made this run blow up)"
        fix = {**finding.fix, "learning_rate": safe} if safe != current_lr else None
        return replace(finding, fix=fix, recommendation=finding.recommendation + note)

    @property
    def history(self) -> tuple[StepRecord, ...]:
        return tuple(self._history)

    def findings(self, record: StepRecord) -> list[Finding]:
        """Every condition that holds at this record, with fixes kept below a blow-up."""
        history, layered = tuple(self._history), tuple(self._layered)
        found = []
        for rule in RULES:
            if rule not in LAYER_RULES:
                found += rule(history, self.facts)
            elif record.layers_measured:
                by_layers = rule(layered, self.facts)
                self._layer_keys.update((f.code, f.layer) for f in by_layers)
                found += by_layers
        if any(f.code == "non_finite" for f in found):
            self.note_blow_up(record.learning_rate)
        return [self._within_ceiling(f, record.learning_rate) for f in found]

    def observe(self, record: StepRecord) -> list[AlertChange]:
        """Add a logged step; what happened to the episodes: "opened" ones are new
        problems, "held" ones go on, "resolved" and "rolled_back" ones ended."""
        changes = []
        if self._history and record.step <= self._history[-1].step:
            for kept in (self._history, self._layered):
                while kept and kept[-1].step >= record.step:
                    kept.pop()
            changes = self.episodes.roll_back(record.step)
        self._history.append(record)
        if record.layers_measured:
            self._layered.append(record)
        if self.facts.start_loss is None and record.step > 0 and record.train_loss_measured \
                and math.isfinite(record.train_loss):
            self.facts = replace(self.facts, start_loss=record.train_loss)
        held = set() if record.layers_measured else self._layer_keys
        return changes + self.episodes.update(record.step, self.findings(record), held)
