"""Trainer overhead: this project's trainer against a bare loop and TensorBoard's writer.

Three ways to run the same steps (small CNN, mnist5k, Adam, batch 64, validation
on 10 batches every --log-every steps), each in a fresh process, interleaved in
rounds (A B C, A B C, ...):
  bare         a plain PyTorch loop;
  ours         train.py with its defaults (control listener, background writer,
               per-layer telemetry and diagnostics every log);
  tensorboard  the bare loop plus torch.utils.tensorboard.SummaryWriter logging
               the same scalars and the same histograms (activations, weights,
               updates per layer).
Each process times the same span: from the end of the step-0 validation to the
end of the last log. Prints each variant's median time per step and its median
ratio to bare in the same round, per back end; --every-step repeats ours with
telemetry on every step.

    python -m bench.overhead [--rounds 5] [--steps 300] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_variant(variant: str, steps: int, log_every: int, db: str, logdir: str) -> float:
    """Seconds for `steps` steps with their logs, measured inside a fresh process."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    if variant == "ours":
        import train
        from db.store import Store

        train.main(["--db", db, "--max-steps", str(steps), "--log-every", str(log_every),
                    "--no-progress", "--checkpoint-dir", str(Path(logdir) / "ck"),
                    "--checkpoint-every", str(10 * steps)])
        store = Store(db)
        rows = store.statistics(store.list_runs(1)[0]["run_id"])
        store.close()
        return (rows[-1]["dt"] - rows[0]["dt"]).total_seconds()

    from data_preparation import load_datasets, make_loaders
    from models import build_model, monitored_layers
    from telemetry import evaluate

    torch.manual_seed(0)
    train_set, val_set, info = load_datasets("mnist5k")
    train_loader, val_loader = make_loaders(train_set, val_set, 64)
    model = build_model("smallcnn", info.num_classes, info.in_channels, info.image_size, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    board = None
    captured: dict[str, torch.Tensor] = {}
    layers = monitored_layers(model)
    if variant == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(logdir)
        for layer in layers:
            layer.module.register_forward_hook(
                lambda m, i, o, name=layer.name: captured.__setitem__(name, o.detach()))

    def log(step: int, train_loss: float, before: list[torch.Tensor]) -> None:
        val_loss, val_acc = evaluate(model, val_loader, torch.device("cpu"), max_batches=10)
        if board is None:
            return
        board.add_scalar("loss/train", train_loss, step)
        board.add_scalar("loss/validation", val_loss, step)
        board.add_scalar("accuracy/validation", val_acc, step)
        board.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
        for layer, b in zip(layers, before, strict=False):
            board.add_histogram(f"activations/{layer.name}", captured[layer.name], step)
            board.add_histogram(f"weights/{layer.name}", layer.module.weight, step)
            board.add_histogram(f"updates/{layer.name}", layer.module.weight - b, step)
        board.flush()

    log(0, float("nan"), [])
    started = time.perf_counter()
    step, loss_sum = 0, torch.zeros(())
    while step < steps:
        for x, y in train_loader:
            logging = (step + 1) % log_every == 0 or step + 1 == steps
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            before = [layer.module.weight.detach().clone() for layer in layers] if (
                logging and board is not None) else []
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
            if logging:
                log(step, (loss_sum / log_every).item(), before)
                loss_sum.zero_()
            if step == steps:
                break
    if board is not None:
        board.close()
    return time.perf_counter() - started


def database(kind: str, tmp: Path, server: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.db'}", None
    import psycopg

    name = f"clt_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}", name


def drop(server: str, name: str | None) -> None:
    if name:
        import psycopg

        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--postgres", default=DEFAULT_POSTGRES)
    p.add_argument("--sqlite-only", action="store_true")
    p.add_argument("--every-step", action="store_true", help="also: ours with --log-every 1")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--logdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant:  # a child process: one measurement
        seconds = run_variant(args.variant, args.steps, args.log_every, args.db, args.logdir)
        print(json.dumps({"seconds": seconds}))
        return 0

    variants = [("bare", args.log_every), ("ours", args.log_every),
                ("tensorboard", args.log_every)]
    if args.every_step:
        variants.append(("ours", 1))
    backends = ["sqlite"] if args.sqlite_only else ["sqlite", "postgresql"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    table = []
    for backend in backends:
        times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant, every in variants:
                with tempfile.TemporaryDirectory() as tmp:
                    url, name = database(backend, Path(tmp), args.postgres)
                    try:
                        out = subprocess.run(
                            [sys.executable, "-m", "bench.overhead", "--variant", variant,
                             "--steps", str(args.steps), "--log-every", str(every),
                             "--db", url, "--logdir", tmp],
                            cwd=tmp, env=env, capture_output=True, text=True, check=True,
                        ).stdout.strip().splitlines()[-1]
                    finally:
                        drop(args.postgres, name)
                times[(variant, every)].append(json.loads(out)["seconds"])
        bare = times[("bare", args.log_every)]
        for (variant, every), seconds in times.items():
            ratios = [s / b for s, b in zip(seconds, bare, strict=True)]
            table.append((backend, variant if every == args.log_every else f"{variant} every step",
                          1000 * stats.median(seconds) / args.steps, stats.median(ratios)))

    print(f"\ntrainer overhead: {args.steps} steps, validation and telemetry every "
          f"{args.log_every}, {args.rounds} interleaved rounds (median)")
    print(f"{'back end':<11} {'variant':<17} {'ms/step':>8} {'x bare':>7}")
    for backend, variant, ms, ratio in table:
        print(f"{backend:<11} {variant:<17} {ms:>8.2f} {ratio:>7.3f}")
    print(f"reproduce: python -m bench.overhead --rounds {args.rounds} --steps {args.steps}"
          + (" --every-step" if args.every_step else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
