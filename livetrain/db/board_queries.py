"""The board's reads that Store lacks: narrow, bounded, and served by primary keys or indexes.

Every refresh of the board asks only for rows newer than what the page holds
(`step > :after`, `version > :after`, `event_id > :after`), so a refresh costs
the same on a 50,000-step run as on a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select

from livetrain.db import schema as s

RUN_LIST_LIMIT = 200
COMPARE_MAX = 10  # runs one comparison overlays
COMPARE_HISTORY_LIMIT = 50  # adopted versions per run in the comparison table
CURVE_ROWS_LIMIT = 1_000_000  # the first load of a run; later refreshes catch up in REFRESH_ROWS
REFRESH_ROWS = 5_000  # rows one refresh may append; a page that fell behind catches up next time
HISTORY_LIMIT = 200  # parameter changes and events shown per run
LAST_POSITION = 1_000_000  # sorts layers missing from model_layers after the known ones

CURVE_COLUMNS = ("train_loss", "validate_loss", "train_accuracy", "validate_accuracy")
# What the loss curves' noise band is drawn from: each loss's spread and sample count.
SPREAD_COLUMNS = ("train_loss_std", "train_loss_count", "validate_loss_std",
                  "validate_loss_count")
ALERT_LEVELS = ("warning", "error")  # events the Alerts panel lists when no episode holds them


def _rows(engine: Engine, query: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def _alert_marks(run_id: int) -> list[Any]:
    """What changes whenever the trainer upserts one of the run's episodes: its newest
    dt_last, the logs all of them held and how many are open (a new log, a new episode,
    one resolved or rolled back). Each reads the run's few rows through the primary key."""
    a = s.alerts

    def over_run(value: Any) -> Any:
        return select(value).where(a.c.run_id == run_id).scalar_subquery()

    return [
        over_run(func.max(a.c.dt_last)).label("alert_time"),
        over_run(func.coalesce(func.sum(a.c.logs), 0)).label("alert_logs"),
        over_run(func.count(case((a.c.status == "open", 1)))).label("alerts_open"),
    ]


class BoardQueries:
    """Read-only queries for the board; writes go through Store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def runs(
        self, limit: int = RUN_LIST_LIMIT, show_hidden: bool = True, keep: Iterable[int] = (),
        only: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, without the config document (the selector does not need it).
        Without `show_hidden`, hidden runs are left out, except those in `keep` (the run
        the page shows, the runs it compares); with `only`, just those runs."""
        r = s.runs
        query = (
            select(r.c.run_id, r.c.name, r.c.model_name, r.c.dataset, r.c.status,
                   r.c.dt_started, r.c.dt_heartbeat, r.c.dt_ended, r.c.tags, r.c.hidden)
            .order_by(r.c.run_id.desc())
            .limit(limit)
        )
        if only is not None:
            query = query.where(r.c.run_id.in_([int(i) for i in only]))
        if not show_hidden:
            kept = [int(k) for k in keep if k is not None]
            query = query.where(or_(~r.c.hidden, r.c.run_id.in_(kept)) if kept else ~r.c.hidden)
        return _rows(self.engine, query)

    def change_marks(self, run_id: int) -> dict[str, Any] | None:
        """In one round trip, a mark of everything a refresh may have to redraw: the
        newest logged step and activations, rollbacks, the parameters row, checkpoints,
        events, alert episodes and the run's state. Each is an index-only MAX or COUNT, a
        key lookup, or an aggregate over the run's few episodes found by their key."""
        def newest(column: Any, table: Any) -> Any:
            return select(func.max(column)).where(table.c.run_id == run_id).scalar_subquery()

        r, p, c = s.runs, s.parameters, s.checkpoints
        query = (
            select(
                newest(s.statistics.c.step, s.statistics).label("step"),
                newest(s.activations.c.step, s.activations).label("activation_step"),
                newest(s.abandoned_statistics.c.branch, s.abandoned_statistics).label("rollbacks"),
                newest(s.events.c.event_id, s.events).label("event_id"),
                *_alert_marks(run_id),
                newest(c.c.step, c).label("checkpoint_step"),
                select(func.count()).where(c.c.run_id == run_id).scalar_subquery()
                .label("checkpoints"),
                p.c.version, p.c.applied_version, r.c.name, r.c.tags, r.c.hidden, r.c.status,
                r.c.dt_heartbeat, r.c.dt_ended,
            )
            .select_from(r.outerjoin(p, p.c.run_id == r.c.run_id))
            .where(r.c.run_id == run_id)
        )
        rows = _rows(self.engine, query)
        return rows[0] if rows else None

    def run(self, run_id: int) -> dict[str, Any] | None:
        rows = _rows(self.engine, select(s.runs).where(s.runs.c.run_id == run_id))
        return rows[0] if rows else None

    def latest_statistics(self, run_id: int, count: int = 2) -> list[dict[str, Any]]:
        """The newest `count` logged steps, newest first (for epoch, step and steps/s)."""
        t = s.statistics
        query = (
            select(t.c.step, t.c.epoch, t.c.dt, t.c.learning_rate, t.c.samples_per_second)
            .where(t.c.run_id == run_id)
            .order_by(t.c.step.desc())
            .limit(count)
        )
        return _rows(self.engine, query)

    def curve_points(
        self, run_id: int, after_step: int = -1, limit: int = REFRESH_ROWS
    ) -> list[tuple[Any, ...]]:
        """(step, train_loss, validate_loss, train_accuracy, validate_accuracy,
        train_loss_std, train_loss_count, validate_loss_std, validate_loss_count),
        oldest first: the curves and their noise band."""
        t = s.statistics
        query = (
            select(t.c.step, *(t.c[name] for name in CURVE_COLUMNS + SPREAD_COLUMNS))
            .where(t.c.run_id == run_id, t.c.step > after_step)
            .order_by(t.c.step)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def rollbacks(self, run_id: int) -> int:
        """How many times the run was rolled back (each cut moves a branch of statistics
        to abandoned_statistics); an index-only MAX on its primary key."""
        t = s.abandoned_statistics
        query = select(func.coalesce(func.max(t.c.branch), 0)).where(t.c.run_id == run_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def parameter_changes(
        self, run_id: int, after_version: int = 0, limit: int = HISTORY_LIMIT
    ) -> list[dict[str, Any]]:
        """Adopted versions after `after_version`, newest first (the newest `limit` of them)."""
        t = s.parameter_changes
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.version > after_version)
            .order_by(t.c.version.desc())
            .limit(limit)
        )
        return _rows(self.engine, query)

    def first_adoption_from(self, run_id: int, version: int) -> dict[str, Any] | None:
        """The adopted version that fulfilled `version`: itself, or the first newer one
        if the trainer skipped straight past it."""
        t = s.parameter_changes
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.version >= version)
            .order_by(t.c.version)
            .limit(1)
        )
        rows = _rows(self.engine, query)
        return rows[0] if rows else None

    def rejection(self, run_id: int, version: int) -> dict[str, Any] | None:
        """The trainer's `parameters_rejected` event for `version`, if any."""
        t = s.events
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.code == "parameters_rejected",
                   t.c.version == version)
            .order_by(t.c.event_id.desc())
            .limit(1)
        )
        rows = _rows(self.engine, query)
        return rows[0] if rows else None

    def events(
        self, run_id: int, after_event_id: int = 0, limit: int = HISTORY_LIMIT
    ) -> list[dict[str, Any]]:
        """Events after `after_event_id`, newest first (the newest `limit` of them)."""
        t = s.events
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.event_id > after_event_id)
            .order_by(t.c.event_id.desc())
            .limit(limit)
        )
        return _rows(self.engine, query)

    def latest_activation_step(self, run_id: int) -> int | None:
        t = s.activations
        query = select(func.max(t.c.step)).where(t.c.run_id == run_id)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def activations_at(self, run_id: int, step: int) -> list[dict[str, Any]]:
        """One histogram per monitored layer at `step`, in forward order (model_layers'
        position; runs without that table's rows: conv before fc, then part and number)."""
        t, m = s.activations, s.model_layers
        position = (
            select(m.c.position)
            .where(m.c.run_id == t.c.run_id, m.c.layer_name == t.c.layer_name)
            .scalar_subquery()
        )
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.step == step)
            .order_by(func.coalesce(position, LAST_POSITION), t.c.layer_type, t.c.nn_part,
                      t.c.number)
        )
        return _rows(self.engine, query)

    # -- issue 4: layer insight, system figures, alerts, checkpoints, rollbacks ----------

    def monitored_layers(self, run_id: int) -> list[str]:
        """The run's conv/fc layers in forward order (the layer picker's options); runs
        without a model table fall back to the layers of their newest logged step."""
        m = s.model_layers
        query = (
            select(m.c.layer_name)
            .where(m.c.run_id == run_id, m.c.monitored)
            .order_by(m.c.position)
        )
        with self.engine.connect() as conn:
            names = list(conn.execute(query).scalars())
            if names:
                return names
            t = s.layer_statistics
            latest = select(func.max(t.c.step)).where(t.c.run_id == run_id).scalar_subquery()
            query = select(t.c.layer_name).where(t.c.run_id == run_id, t.c.step == latest)
            return sorted(conn.execute(query).scalars())

    def step_window_start(self, run_id: int, window: int) -> int:
        """The step just before the newest `window` logged steps (-1 if there are fewer),
        so a first load of the layer charts reads a bounded tail of a long run."""
        t = s.statistics
        query = (
            select(t.c.step)
            .where(t.c.run_id == run_id)
            .order_by(t.c.step.desc())
            .offset(window)
            .limit(1)
        )
        with self.engine.connect() as conn:
            step = conn.execute(query).scalar()
        return -1 if step is None else int(step)

    def layer_points(
        self, run_id: int, layers: Sequence[str], after_step: int = -1,
        limit: int = REFRESH_ROWS,
    ) -> list[dict[str, Any]]:
        """Per-layer statistics of `layers` after `after_step`, oldest step first."""
        t = s.layer_statistics
        query = (
            select(t.c.step, t.c.layer_name, t.c.act_mean, t.c.act_std, t.c.grad_norm,
                   t.c.update_ratio)
            .where(t.c.run_id == run_id, t.c.step > after_step,
                   t.c.layer_name.in_(list(layers)))
            .order_by(t.c.step, t.c.layer_name)
            .limit(limit)
        )
        return _rows(self.engine, query)

    def learning_rates(
        self, run_id: int, after_step: int = -1, limit: int = REFRESH_ROWS
    ) -> list[tuple[int, float]]:
        """(step, learning rate in force), oldest first."""
        t = s.statistics
        query = (
            select(t.c.step, t.c.learning_rate)
            .where(t.c.run_id == run_id, t.c.step > after_step)
            .order_by(t.c.step)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(query)]

    def latest_histogram_step(self, run_id: int, layer: str) -> int | None:
        t = s.layer_histograms
        query = select(func.max(t.c.step)).where(t.c.run_id == run_id, t.c.layer_name == layer)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def layer_histograms_at(self, run_id: int, layer: str, step: int) -> dict[str, dict]:
        """{'weight': row, 'update': row} of one layer at one step (either may be missing)."""
        t = s.layer_histograms
        query = select(t.c.kind, t.c.bin_edges, t.c.counts).where(
            t.c.run_id == run_id, t.c.step == step, t.c.layer_name == layer
        )
        return {row["kind"]: row for row in _rows(self.engine, query)}

    def model_table(self, run_id: int) -> list[dict[str, Any]]:
        m = s.model_layers
        return _rows(self.engine, select(m).where(m.c.run_id == run_id).order_by(m.c.position))

    def system_points(
        self, run_id: int, after_sample: int = 0, limit: int = REFRESH_ROWS
    ) -> list[dict[str, Any]]:
        """System samples after `after_sample` (sample_id), oldest first."""
        t = s.system_metrics
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.sample_id > after_sample)
            .order_by(t.c.sample_id)
            .limit(limit)
        )
        return _rows(self.engine, query)

    def last_system_sample(self, run_id: int, before: int) -> int:
        """The sample_id just before the newest `before` samples (0 if there are fewer)."""
        t = s.system_metrics
        query = (
            select(t.c.sample_id)
            .where(t.c.run_id == run_id)
            .order_by(t.c.sample_id.desc())
            .offset(before)
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar() or 0

    def alert_marks(self, run_id: int) -> dict[str, Any]:
        """What the Alerts panel was drawn from: the newest event and the episodes' marks
        (see _alert_marks), one round trip."""
        query = select(
            select(func.max(s.events.c.event_id)).where(s.events.c.run_id == run_id)
            .scalar_subquery().label("event_id"),
            *_alert_marks(run_id),
        )
        return _rows(self.engine, query)[0]

    def episodes(self, run_id: int, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
        """The run's alert episodes: open ones first (never cut by `limit`), then by their
        latest log, newest first."""
        a = s.alerts
        query = (
            select(a)
            .where(a.c.run_id == run_id)
            .order_by((a.c.status == "open").desc(), a.c.last_step.desc(), a.c.alert_id)
            .limit(limit)
        )
        return _rows(self.engine, query)

    def episode(self, run_id: int, alert_id: str) -> dict[str, Any] | None:
        a = s.alerts
        rows = _rows(self.engine, select(a).where(a.c.run_id == run_id, a.c.alert_id == alert_id))
        return rows[0] if rows else None

    def alert_events(self, run_id: int, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
        """Warning and error events no episode stands for, newest first: one-off logs (a
        failed run, a refused change) and the diagnostics of runs logged before episodes.
        An episode's code covers its events: the trainer logs one when an episode opens."""
        t, a = s.events, s.alerts
        covered = select(a.c.alert_id).where(a.c.run_id == t.c.run_id, a.c.code == t.c.code)
        query = (
            select(t)
            .where(t.c.run_id == run_id, t.c.level.in_(ALERT_LEVELS), ~covered.exists())
            .order_by(t.c.event_id.desc())
            .limit(limit)
        )
        return _rows(self.engine, query)

    def event(self, run_id: int, event_id: int) -> dict[str, Any] | None:
        t = s.events
        rows = _rows(self.engine, select(t).where(t.c.run_id == run_id, t.c.event_id == event_id))
        return rows[0] if rows else None

    def checkpoints(self, run_id: int, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
        """Steps the run can be rolled back to, newest first."""
        c = s.checkpoints
        query = (
            select(c.c.step, c.c.epoch, c.c.reason, c.c.dt)
            .where(c.c.run_id == run_id)
            .order_by(c.c.step.desc())
            .limit(limit)
        )
        return _rows(self.engine, query)

    def abandoned_points(
        self, run_id: int, limit: int = CURVE_ROWS_LIMIT
    ) -> list[tuple[Any, ...]]:
        """(branch, step, train_loss, validate_loss, train_accuracy, validate_accuracy) of
        every branch a rollback cut off, by branch then step."""
        t = s.abandoned_statistics
        query = (
            select(t.c.branch, t.c.step, *(t.c[name] for name in CURVE_COLUMNS))
            .where(t.c.run_id == run_id)
            .order_by(t.c.branch, t.c.step)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    # -- issue 7: several runs compared ------------------------------------------------
    # One query per concern, each over every compared run at once (run_id IN ...).

    def compare_marks(self, run_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Each compared run's row (without config) and what a comparison redraws on:
        its newest logged step, rollbacks and newest adopted version, each an
        index-only MAX. Runs that do not exist are left out."""
        r = s.runs

        def newest(column: Any, table: Any) -> Any:
            return (select(func.max(column)).where(table.c.run_id == r.c.run_id)
                    .scalar_subquery())

        query = select(
            r.c.run_id, r.c.name, r.c.model_name, r.c.dataset, r.c.status, r.c.dt_heartbeat,
            r.c.dt_ended, r.c.tags, r.c.hidden,
            newest(s.statistics.c.step, s.statistics).label("step"),
            newest(s.abandoned_statistics.c.branch, s.abandoned_statistics).label("rollbacks"),
            newest(s.parameter_changes.c.version, s.parameter_changes).label("version"),
        ).where(r.c.run_id.in_(list(run_ids)))
        return _rows(self.engine, query)

    def compare_points(
        self, run_ids: Sequence[int], limit: int | None = None
    ) -> list[tuple[Any, ...]]:
        """(run_id, step, train_loss, validate_loss, train_accuracy, validate_accuracy) of
        every compared run, by run then step (at most CURVE_ROWS_LIMIT a run by default)."""
        t = s.statistics
        query = (
            select(t.c.run_id, t.c.step, *(t.c[name] for name in CURVE_COLUMNS))
            .where(t.c.run_id.in_(list(run_ids)))
            .order_by(t.c.run_id, t.c.step)
            .limit(CURVE_ROWS_LIMIT * max(1, len(run_ids)) if limit is None else limit)
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def compare_points_after(
        self, after: Mapping[int, int], limit: int = REFRESH_ROWS
    ) -> list[tuple[Any, ...]]:
        """The same rows, only those after each run's step in `after`; by run then step,
        so a cut at `limit` leaves every run's rows a prefix the next refresh continues."""
        if not after:
            return []
        t = s.statistics
        query = (
            select(t.c.run_id, t.c.step, *(t.c[name] for name in CURVE_COLUMNS))
            .where(or_(*(and_(t.c.run_id == run_id, t.c.step > step)
                         for run_id, step in after.items())))
            .order_by(t.c.run_id, t.c.step)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def compare_changes(
        self, run_ids: Sequence[int], per_run: int = COMPARE_HISTORY_LIMIT
    ) -> list[dict[str, Any]]:
        """The newest `per_run` adopted versions of each run, by run then version."""
        t = s.parameter_changes
        ranked = (
            select(t, func.row_number().over(partition_by=t.c.run_id,
                                             order_by=t.c.version.desc()).label("newest"))
            .where(t.c.run_id.in_(list(run_ids)))
            .subquery()
        )
        query = (
            select(*(ranked.c[c.name] for c in t.columns))
            .where(ranked.c.newest <= per_run)
            .order_by(ranked.c.run_id, ranked.c.version)
        )
        return _rows(self.engine, query)

