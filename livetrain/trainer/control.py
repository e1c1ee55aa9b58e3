"""The control loop's trainer side: taking a new parameters version at a step boundary.

A background listener (livetrain.db.listener) hands over each new version of the run's
`parameters` row; the Controller applies it between two steps and acknowledges it
with the step, so the board can say "applied at step N". Nothing here waits on the
database: the listener and the writer do, beside the loop.

Under torchrun only rank 0 listens; at each step boundary every rank learns, from a
non-blocking collective sent at the last one, whether news had arrived, and rank 0's
version reaches all ranks, so they all apply it at the same step: one step after
rank 0 saw it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from livetrain.db.contract import Hyperparameters
from livetrain.db.store import ParameterState, now
from livetrain.trainer.checkpointing import CheckpointRefusedError, read_checkpoint, restorable
from livetrain.trainer.ownership import say

if TYPE_CHECKING:
    from livetrain.trainer.checkpointing import Checkpoint, Restorable
    from livetrain.trainer.run import LiveRun

PAUSE_POLL_SECONDS = 0.2


def describe(p: Hyperparameters) -> str:
    return f"{p.optimizer}, lr {p.learning_rate:g}, weight decay {p.weight_decay:g}, " \
        f"dropout {p.dropout} %"


def describe_change(old: Hyperparameters, new: Hyperparameters) -> str:
    changes = new.changes_from(old)
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "no value changed"


def rejection(version: int, errors: dict[str, str], in_force: Hyperparameters,
              stopping: bool, paused: bool) -> str:
    """The `parameters_rejected` message: each bad column with its value, and what runs."""
    then = "stopping as requested" if stopping else "paused" if paused else "training continues"
    return f"version {version}: rejected {'; '.join(errors.values())}; {then} with " \
        f"{describe(in_force)}"


def adopted(new: Hyperparameters | None, old: Hyperparameters, restored: int | None,
            flags_before: tuple[bool, bool], flags_after: tuple[bool, bool]) -> bool:
    """Whether a partly rejected version changed anything in force, and so is acknowledged."""
    return (new is not None and new != old) or restored is not None \
        or flags_after != flags_before or any(flags_after)


def read_restorable(run: LiveRun, found: Checkpoint) -> Restorable | str:
    """Rank 0 reads the checkpoint file and every rank checks it against its own model:
    the checked state, or why it was refused (the same answer on every rank)."""
    state = None
    if run.ranks.is_main:
        try:
            state = read_checkpoint(run.ring.directory, found, run.run_id)
        except CheckpointRefusedError as exc:
            state = str(exc)
    state = run.ranks.from_main(state)
    if isinstance(state, str):
        return state
    try:
        return restorable(state, run.model, found, like=run.optimizer)
    except CheckpointRefusedError as exc:
        return str(exc)


class Controller:
    """What the run's parameters row asks for, and what of it is in force."""

    def __init__(self, run: LiveRun, params: Hyperparameters, handled_rollback: int) -> None:
        self.run = run
        self.params = params
        self.stopping = False  # a stop from the board or SQL, adopted
        self.paused = False
        self.stop_asked = False  # Ctrl-C (on any rank)
        self.handled_rollback = handled_rollback
        self.deferred: ParameterState | None = None  # a version that waits for the log's end

    def poll(self, during_log: bool = False) -> None:
        """Adopt a new version if one has arrived.

        Called at each step boundary and between validation batches, which sit at the
        same boundary: a change waits for one batch, not for a whole log. A rollback
        (and anything after it) waits for the log to finish.
        """
        run, listener = self.run, self.run.listener
        for code, message in listener.notices() if listener is not None else ():
            run.writer.event("warning", code, message, step=run.global_step)
        if not during_log and self.deferred is not None:
            state, self.deferred = self.deferred, None
            self.adopt(state)
        waiting = listener is not None and listener.changed.is_set()
        if during_log:
            if not waiting or (state := listener.take()) is None:
                return
        else:
            state = self.news_at_boundary(waiting)
            if state is None:
                return
        if during_log and (self.deferred is not None
                           or state.new_rollback_request(self.handled_rollback)):
            self.deferred = state
            return
        self.adopt(state)

    def news_at_boundary(self, waiting: bool) -> ParameterState | None:
        """The version to apply at this step boundary, if any. Under torchrun every rank
        learns here what rank 0 had at the last boundary (a new version waiting, a stop
        asked on any rank), so that all take it at this one, and sends what it has now,
        after its take (see distributed.py)."""
        run, listener, ranks = self.run, self.run.listener, self.run.ranks
        stop = run.stop.requested.is_set()
        if ranks.distributed:
            waiting, stop = ranks.agreed(2)
        self.stop_asked = self.stop_asked or stop
        state = ranks.from_main(listener.take() if listener is not None else None) \
            if waiting else None
        if ranks.distributed:
            ranks.send(listener is not None and listener.changed.is_set(),
                       run.stop.requested.is_set())
        return state

    def adopt(self, state: ParameterState) -> None:
        """Apply a new parameters version at this step boundary.

        A value that is invalid (forced past the constraints, or written into an SQLite
        table older than its type checks) is rejected with a warning, and what was in
        force stays: all hyperparameters if one is bad, the one control (stop, pause,
        rollback) whose column is bad. A valid value that this model or framework cannot
        take (a dropout without a dropout layer, Adam or a weight decay for sparse
        gradients, a switch the framework refuses) is refused alone: the other values
        of the version still apply. The rest of the version is still honoured: a valid
        stop always stops.
        """
        run = self.run
        new, errors = state.hyperparameters()
        bad = state.rejected()
        fresh_request = state.new_rollback_request(self.handled_rollback) \
            and state.rollback_step is not None  # a bad step is answered by the rejection
        wants_rollback = fresh_request and "rollback_step" not in bad
        restored = None
        if fresh_request:
            self.handled_rollback = state.rollback_request
        if wants_rollback:
            restored = self.roll_back(state.rollback_step)
        if new is not None:  # weighed against what is in force now, after any rollback
            new, refused = self.fitting(new)
            errors |= refused
            if new != self.params and not wants_rollback and not self.paused:
                run.checkpoint("before_change")  # so a bad change can be undone
            try:
                run.apply_parameters(self.params, new)
            except (ValueError, RuntimeError) as exc:
                new, errors = None, {"model": f"the model cannot take it ({exc})"}
        before = (self.stopping, self.paused)
        self.stopping = state.stop_train if "stop_train" not in bad else self.stopping
        self.paused = state.pause_train if "pause_train" not in bad else self.paused
        if errors or bad:
            run.writer.event("warning", "parameters_rejected", rejection(
                state.version, errors | bad, new or self.params, self.stopping, self.paused),
                step=run.global_step, version=state.version)
            if not adopted(new, self.params, restored, before, (self.stopping, self.paused)):
                return  # nothing of this version was adopted
        self.acknowledge(state, new, restored, resumed=before[1] and not self.paused)
        self.params = new or self.params

    def fitting(self, new: Hyperparameters) -> tuple[Hyperparameters, dict[str, str]]:
        """`new` less the values this run cannot take, each put back to the one in force,
        and why each was refused. A refusal names a changed value only, so each round
        puts one back and this ends; a second round catches what a first refusal
        changes (a switch refused, its weight decay then weighed for the old optimizer)."""
        refused: dict[str, str] = {}
        while why := self.run.refusals(self.params, new):
            refused |= why
            new = dataclasses.replace(new, **{c: getattr(self.params, c) for c in why})
        return new, refused

    def acknowledge(self, state: ParameterState, new: Hyperparameters | None,
                    restored: int | None, resumed: bool = False) -> None:
        """The parameter_changes row and the events that say what was applied at which step."""
        run, step = self.run, self.run.global_step
        run.writer.acknowledge({
            "version": state.version, **vars(new or self.params), "stop_train": self.stopping,
            "pause_train": self.paused, "rollback_step": restored,
            "dt_updated": state.dt_updated or now(), "applied_step": step, "dt_applied": now(),
        })
        if new is not None:
            flags = ", paused" * self.paused + ", resumed" * resumed \
                + ", stopping" * self.stopping
            run.writer.event("info", "parameters_applied",
                             f"version {state.version} applied at step {step}: "
                             f"{describe_change(self.params, new)}{flags}",
                             step=step, version=state.version)
        if run.ranks.distributed:  # each rank says so: the proof that they agree on the step
            say(f"rank {run.ranks.rank}: version {state.version} applied at step {step}: "
                f"{describe(new or self.params)}{', stopping' * self.stopping}"
                f"{', paused' * self.paused}")

    def roll_back(self, target: int) -> int | None:
        """Restore the newest checkpoint at or before `target`; the step restored."""
        run = self.run
        found = run.ranks.from_main(run.ring.newest_at_or_before(target))
        if found is None:
            run.writer.event("warning", "rollback_unavailable",
                             f"no checkpoint at or before step {target} to roll back to",
                             step=run.global_step)
            return None
        loaded = read_restorable(run, found)
        if not isinstance(loaded, str) and type(loaded.optimizer) is not type(run.optimizer) \
                and (why := run.switch_refusal()):
            run.writer.event("warning", "parameters_rejected", f"no rollback to step {target}: "
                             f"its checkpoint holds another optimizer, and {why}; training "
                             f"goes on from step {run.global_step}", step=run.global_step)
            return None
        if isinstance(loaded, str):  # nothing changed: training goes on as it was
            run.writer.event("warning", "rollback_failed", f"no rollback to step {target}: "
                             f"{loaded}; training goes on from step {run.global_step}",
                             step=run.global_step)
            return None
        run.writer.event("info", "rolled_back", f"rolled back from step {run.global_step} to "
                         f"the checkpoint of step {found.step}; steps after it are kept as an "
                         "abandoned branch", step=found.step)
        run.restore(found, loaded)
        return found.step

    def wait_while_paused(self) -> None:
        """Keep the process alive and listening (the writer keeps the heartbeat)."""
        run = self.run
        run.writer.status("paused")
        if run.ranks.is_main:
            say(f"run {run.run_id} paused at step {run.global_step}: waiting for the board")
        while self.paused and not self.stopping and not self.stop_asked:
            if run.listener is not None:
                run.listener.changed.wait(PAUSE_POLL_SECONDS)
            else:
                time.sleep(PAUSE_POLL_SECONDS)  # rank 0 brings the news to the next poll
            self.poll()
        if not self.stopping and not self.stop_asked:
            run.writer.status("running")
