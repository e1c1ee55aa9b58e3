"""Every board query is served by an index on PostgreSQL (issue: refreshes must not scan).

The board's queries are captured as they run, then EXPLAINed with sequential
scans disabled: if a plan still scans a table sequentially, no index can serve
that query, and a long run would make every refresh slower.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from livetrain.db.board_queries import BoardQueries
from livetrain.db.contract import DEFAULTS, Hyperparameters
from livetrain.db.store import Batch, Store, now


def seed(store: Store) -> int:
    run_ids = [store.create_run(f"r{i}", "smallcnn", "mnist5k", {}, Hyperparameters(**DEFAULTS))
               for i in range(2)]
    for run_id in run_ids:
        stats, layers, hists, events, system = [], [], [], [], []
        for step in range(0, 2000, 10):
            stats.append({"step": step, "epoch": 1, "dt": now(), "optimizer": "Adam",
                          "learning_rate": 3e-4, "weight_decay": 0.0, "dropout": 50,
                          "train_loss": 1.0, "validate_loss": 1.0, "train_loss_count": 10,
                          "train_loss_std": 0.1, "validate_loss_count": 2,
                          "validate_loss_std": 0.2})
            layers.append({"step": step, "layer_name": "features.0", "has_nonlinearity": True,
                           "act_std": 1.0, "grad_norm": 1.0, "update_ratio": 1e-3})
            hists.append({"step": step, "layer_name": "features.0", "kind": "weight",
                          "bin_edges": [0.0, 1.0], "counts": [1]})
            events.append({"level": "warning", "code": "x", "message": "m", "step": step,
                           "dt": now()})
            system.append({"dt": now(), "step": step, "cpu_percent": 50.0})
        alerts = [{"alert_id": f"loss_rising:{k}", "code": "loss_rising", "level": "warning",
                   "status": "open" if k == 19 else "resolved", "first_step": 100 * k,
                   "last_step": 100 * k + 50, "logs": 6, "message": "m", "dt_first": now(),
                   "dt_last": now()} for k in range(20)]
        store.write_batch(run_id, Batch(
            statistics=stats, layer_statistics=layers, layer_histograms=hists, events=events,
            system_metrics=system, alerts=alerts,
            activations=[{"step": 1990, "layer_name": "features.0", "nn_part": "features",
                          "layer_type": "conv", "number": 0, "bin_edges": [0.0, 1.0],
                          "counts": [1]}],
            model_layers=[{"position": 0, "layer_name": "features.0", "layer_type": "Conv2d",
                           "output_shape": "8x28x28", "parameters": 80, "trainable": 80,
                           "monitored": True}],
            checkpoints=[{"step": 1000, "epoch": 1, "reason": "periodic", "path": "/x",
                          "bytes": 1, "dt": now()}],
        ))
    store.write_batch(run_ids[0], Batch(abandon_after=1500))
    store.set_run_hidden(run_ids[1], True)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return run_ids[0]


def every_board_query(q: BoardQueries, run_id: int) -> None:
    q.runs()
    q.change_marks(run_id)
    q.run(run_id)
    q.latest_statistics(run_id)
    q.curve_points(run_id, after_step=100)
    q.rollbacks(run_id)
    q.parameter_changes(run_id, after_version=0)
    q.first_adoption_from(run_id, 1)
    q.rejection(run_id, 1)
    q.events(run_id, after_event_id=5)
    step = q.latest_activation_step(run_id)
    q.activations_at(run_id, step)
    layers = q.monitored_layers(run_id)
    q.step_window_start(run_id, 500)
    q.layer_points(run_id, layers, after_step=100)
    q.learning_rates(run_id, after_step=100)
    hist_step = q.latest_histogram_step(run_id, "features.0")
    q.layer_histograms_at(run_id, "features.0", hist_step)
    q.model_table(run_id)
    q.system_points(run_id, after_sample=3)
    q.last_system_sample(run_id, 50)
    q.alert_marks(run_id)
    q.episodes(run_id)
    q.episode(run_id, "loss_rising:1")
    q.alert_events(run_id)
    q.event(run_id, 4)
    q.checkpoints(run_id)
    q.abandoned_points(run_id)
    # issue 7: the run lists without hidden runs, and a comparison of both seeded runs
    q.runs(show_hidden=False, keep=[run_id])
    q.runs(only=[run_id])
    both = [run_id, run_id + 1]
    q.compare_marks(both)
    q.compare_points(both)
    q.compare_points_after({run_id: 1500, run_id + 1: 1900})
    q.compare_changes(both)


def plan_nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    found = [(plan["Node Type"], plan.get("Relation Name"))]
    for child in plan.get("Plans", []):
        found += plan_nodes(child)
    return found


def test_every_board_query_uses_an_index(postgres_url: str) -> None:
    store = Store(postgres_url)
    run_id = seed(store)
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    every_board_query(BoardQueries(store.engine), run_id)
    event.remove(store.engine, "before_cursor_execute", capture)
    assert len(captured) >= 20

    scans = []
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET enable_seqscan = off")
        for statement, parameters in captured:
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plan = cursor.fetchone()[0][0]["Plan"]
            scans += [(table, statement) for node, table in plan_nodes(plan)
                      if node == "Seq Scan"]
    finally:
        raw.close()
        store.close()
    assert scans == [], "sequential scans: " + "\n".join(f"{t}: {q}" for t, q in scans)
