"""Continuing a run from its latest checkpoint, after its trainer died or was stopped.

Everything is read and checked before the run is touched: a refused checkpoint leaves
the run as it was, with a `resume_refused` event saying why.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from livetrain.db.store import ParameterState
from livetrain.trainer.checkpointing import (
    Checkpoint,
    CheckpointRefusedError,
    CheckpointRing,
    Restorable,
    read_checkpoint,
    restorable,
)
from livetrain.trainer.ownership import claim_run

if TYPE_CHECKING:
    from livetrain.trainer.run import LiveRun


class ResumeRefusedError(Exception):
    """The run cannot be resumed; the message says why. Nothing of the run was changed."""


def resume_checkpoint(run: LiveRun, run_id: int, directory: Path
                      ) -> tuple[Checkpoint, Restorable] | str:
    """The checked checkpoint a resume starts from, or why there is none (the same answer
    on every rank: rank 0 reads, every rank checks against its own model)."""
    ranks, found = run.ranks, None
    if ranks.is_main:
        row = run.store.latest_checkpoint(run_id)
        try:
            if row is None:
                raise CheckpointRefusedError(f"run {run_id} has no checkpoint")
            found = CheckpointRing.from_row(row)
            found = (found, read_checkpoint(directory, found, run_id))
        except CheckpointRefusedError as exc:
            found = str(exc)
    found = ranks.from_main(found)
    if isinstance(found, str):
        return found
    checkpoint, state = found
    try:
        return checkpoint, restorable(state, run.model, checkpoint, like=run.optimizer)
    except CheckpointRefusedError as exc:
        return str(exc)


def resume_run(run: LiveRun, run_id: int, directory: Path
               ) -> tuple[tuple[Checkpoint, Restorable], ParameterState, int]:
    """Claim the run, check its checkpoint and reopen it: (the checkpoint to restore, the
    parameters row to adopt at the restored step, the rollback request already handled).
    ResumeRefusedError when it cannot be resumed."""
    store = run.store
    if run.ranks.is_main:
        found = store.get_run(run_id)
        problem = None if found is not None else f"there is no run {run_id}"
        if problem is None and store.get_parameters(run_id) is None:
            problem = f"run {run_id} has no parameters row to steer it with"
        if problem is None:
            try:
                claim_run(store, found, run.stop.requested)
            except LookupError as exc:
                problem = str(exc)
        problem = run.ranks.from_main(problem)
    else:
        problem = run.ranks.from_main(None)
    if problem is not None:
        raise ResumeRefusedError(problem)
    checkpoint = resume_checkpoint(run, run_id, directory)
    if isinstance(checkpoint, str):
        if run.ranks.is_main:
            with contextlib.suppress(SQLAlchemyError):  # if the database is gone too, the
                store.add_event(run_id, "error", "resume_refused",  # error still says why
                                f"cannot resume: {checkpoint}; the run is left as it was")
        raise ResumeRefusedError(checkpoint)
    state = None
    if run.ranks.is_main:
        # The parameters row is honoured as it stands, except a stop or pause left from
        # before: resuming is asking the run to go on.
        state = store.get_parameters(run_id)
        if state.stop_train or state.pause_train:
            store.submit_parameters(run_id, stop_train=False, pause_train=False)
            state = store.get_parameters(run_id)
        store.reopen_run(run_id)
    state = run.ranks.from_main(state)
    handled_rollback = 0 if "rollback_request" in state.rejected() \
        else state.rollback_request  # a bad count counts as 0
    return checkpoint, state, handled_rollback
