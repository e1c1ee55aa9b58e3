"""Framework callbacks' overhead: each framework's own Trainer with and without livetrain's
`LiveTrainingCallback`, on the same steps.

Two frameworks, each run with and without the callback:
  lightning      a Lightning 2.x Trainer fitting train.py's small CNN on mnist5k
                 (batch 64, Adam at 3e-4, no validation loop);
  transformers   a transformers 5.x Trainer on a random-init BERT-tiny (the smallest
                 BERT Google published: 2 layers, hidden 128, 2 heads, BERT's 30,522-token
                 vocabulary, 4.4 M parameters; built from a BertConfig, no download)
                 classifying random token sequences.
With the callback: livetrain's LiveTrainingCallback, on SQLite in a temporary folder,
log_every 50, per-layer telemetry at each log.

Why the two fits take turns: on this VM the same fit's time drifts by 10 to 25 % for
seconds to tens of seconds at a time (five identical bare Lightning fits of 200 steps
in one process: 59 to 72 ms a step, slow throughout the slow fits), so comparing
whole runs in separate processes flipped between passing and failing a 3 % budget
from one run of the benchmark to the next, and so did adjacent 100-step fits in one
process (their ratios' quartiles: 0.95 to 1.17). Here each process (--rounds of them)
runs both fits at once in two threads that take turns a step at a time, pinned to one
core, so whatever slows the machine slows both alike; which fit takes the first turn
alternates from process to process. The figure is the callback fit's time per step
over the bare fit's, all processes' steps together; beside it, the same ratio in each
process. What the method still leaves: two bare fits measured this way differ by up
to 0.5 % (Lightning) and up to 8 % (transformers, from fit to fit, whichever thread;
not understood: not the machine's drift, which both share), and livetrain's
background threads (writer, listener, system sampler) share the core, so their work
lands in whichever fit's step is running, half of it in the bare fit's.

A step's time runs from its fit getting the turn to the end of the step's hooks (a
timing callback after livetrain's), so it holds the framework's loop, the step's
start and end hooks and, on a step that logs, the log of the step before (written at
the next step's start, after the framework's evaluation). The first step, which pays
the setup, is left out; a fit has 4 x 50 + 1 steps, so the rest hold whole log
intervals. What a run pays once (opening the database and the first checkpoint
before the first step, the last log and draining the writer at the end) is a fixed
cost, not a ratio: the closing part is printed as its own column, the extra time of
the train-end hooks. As in bench.overhead, torch runs on one intra-op thread
(--threads 1, see bench/overhead.py for why), and glibc's mmap and trim thresholds
are fixed before the first tensor (livetrain/trainer/allocator.py, what train.py
does).

    python -m bench.frameworks [--rounds 4] [--steps 201] [--hf-steps 201]

The callbacks' cost is mostly a fixed ~0.5 ms a step (the step's bookkeeping, and a
log's telemetry every 50 steps; under transformers the gradient check before each
update reads the norm the Trainer computed, under Lightning it computes it): 1 to 2 %
of these steps (55 to 80 ms here), 5 to 10 % of a 20 ms step of a toy 0.2 M-parameter
BERT (hidden 64), which is why the transformers pair uses a BERT size that is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import budget

ROOT = Path(__file__).resolve().parent.parent
LOG_EVERY = 50
FRAMEWORKS = ("lightning", "transformers")
# BERT-tiny (google/bert_uncased_L-2_H-128_A-2's sizes), sequences of 64 tokens, batch 16.
BERT = {"vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 512,
        "num_labels": 2}
SEQUENCE, BERT_BATCH, BERT_SAMPLES = 64, 16, 2048


class Turns:
    """Two fits in two threads take turns, a step each: one runs while the other waits,
    so whatever slows the machine for a while slows both alike."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False, False]

    def wait(self, me: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == me or self._done[1 - me])

    def hand_over(self, me: int, done: bool = False) -> None:
        with self._cond:
            self._done[me] = self._done[me] or done
            self._turn = 1 - me
            self._cond.notify_all()


class StepClock:
    """One fit's side of the turns: the wall time of each of its steps, from getting the
    turn to the end of the step's hooks, and of its train-end hooks. The framework's
    timing callback (after livetrain's) calls `stepped` and `ended`."""

    def __init__(self, turns: Turns, me: int) -> None:
        self.turns, self.me = turns, me
        self.steps: list[float] = []
        self.closing: float | None = None
        self._since = 0.0

    def begin(self) -> None:
        self.turns.wait(self.me)
        self._since = time.perf_counter()

    def stepped(self) -> None:
        self.steps.append(time.perf_counter() - self._since)
        self.turns.hand_over(self.me)
        self.turns.wait(self.me)
        self._since = time.perf_counter()

    def ended(self) -> None:
        self.closing = time.perf_counter() - self._since

    def finish(self) -> None:
        self.turns.hand_over(self.me, done=True)


def run_lightning(live: bool, steps: int, db: str, logdir: str, clock: StepClock) -> None:
    """A Lightning fit of `steps` steps, timed by `clock`."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from livetrain.playground.data import load_datasets, make_loaders
    from livetrain.playground.models import build_model

    class Classifier(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            logits = self.model(x)
            return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits.detach()}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=3e-4)

    class Timer(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.stepped()

        def on_train_end(self, *args: Any) -> None:
            clock.ended()

    torch.manual_seed(0)
    train_set, val_set, info = load_datasets("mnist5k")
    train_loader, _ = make_loaders(train_set, val_set, 64)
    module = Classifier(build_model("smallcnn", info.num_classes, info.in_channels,
                                    info.image_size, 0.5))
    callbacks: list[pl.Callback] = [Timer()]
    if live:
        from livetrain.lightning import LiveTrainingCallback

        callbacks.insert(0, LiveTrainingCallback(
            db=db, name="bench-lightning", log_every=LOG_EVERY,
            checkpoint_dir=Path(logdir) / "ck"))
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=logdir, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks)
    trainer.fit(module, train_loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"the fit ended at step {trainer.global_step}, not {steps}")
    if live and callbacks[0].run.global_step != steps:
        raise RuntimeError(f"the live run counted {callbacks[0].run.global_step} steps")


def token_dataset() -> Any:
    """Random token sequences labelled by whether token 7 occurs more than token 8: a
    task a BERT can start to learn, and nothing to download."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, BERT["vocab_size"], (BERT_SAMPLES, SEQUENCE), generator=generator)
    labels = ((ids == 7).sum(1) > (ids == 8).sum(1)).long()
    mask = torch.ones_like(ids)
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(ids, mask, labels, strict=True)]


def run_transformers(live: bool, steps: int, db: str, logdir: str, clock: StepClock) -> None:
    """A transformers Trainer run of `steps` steps, timed by `clock`."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Timer(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.stepped()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            clock.ended()

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT))
    args = TrainingArguments(
        output_dir=str(Path(logdir) / "hf"), max_steps=steps,
        per_device_train_batch_size=BERT_BATCH, learning_rate=3e-4, seed=0, use_cpu=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    callbacks: list[TrainerCallback] = [Timer()]
    if live:
        from livetrain.transformers import LiveTrainingCallback

        callbacks.insert(0, LiveTrainingCallback(
            db=db, name="bench-transformers", log_every=LOG_EVERY,
            checkpoint_dir=Path(logdir) / "ck"))
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                      callbacks=callbacks)
    trainer.train()
    if trainer.state.global_step != steps:
        raise RuntimeError(f"the run ended at step {trainer.state.global_step}, not {steps}")
    if live and callbacks[0].run.global_step != steps:
        raise RuntimeError(f"the live run counted {callbacks[0].run.global_step} steps")


def child(framework: str, steps: int, live_first: bool, logdir: str) -> dict[str, Any]:
    """One process's measurement: a fit with the callback and one without, each in its
    own thread with its own model, Trainer and SQLite database, taking turns a step at
    a time. Each variant's step times (the first step, which pays the setup and the lazy
    initialisations, left out) and its train-end hooks' time."""
    from livetrain.trainer.allocator import keep_freed_memory

    keep_freed_memory()  # before the first tensor; both variants share the process
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core: both run on it
    runner = run_lightning if framework == "lightning" else run_transformers
    turns = Turns()
    variants = (True, False) if live_first else (False, True)
    clocks = {live: StepClock(turns, me) for me, live in enumerate(variants)}
    errors: list[BaseException] = []

    def fit(live: bool) -> None:
        clock = clocks[live]
        try:
            clock.begin()
            name = "live" if live else "bare"
            runner(live, steps, f"sqlite:///{Path(logdir) / f'{name}.db'}",
                   str(Path(logdir) / name), clock)
        except BaseException as error:  # reported by the parent, after both threads end
            errors.append(error)
        finally:
            clock.finish()

    threads = [threading.Thread(target=fit, args=(live,)) for live in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {"bare": clocks[False].steps[1:], "live": clocks[True].steps[1:],
            "bare_closing": clocks[False].closing, "live_closing": clocks[True].closing}


def measure(framework: str, steps: int, live_first: bool, threads: int) -> dict[str, Any]:
    """`child` in a fresh process, with its own temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    order = ["--live-first"] if live_first else []
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "bench.frameworks", "--child", framework,
             "--steps", str(steps), "--logdir", tmp, *order],
            cwd=tmp, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class PairResult:
    """One framework's figures: the verdict's ratio, and beside it what shows how far
    it can be trusted."""

    bare_ms: float  # ms per step without the callback, all processes' steps together
    live_ms: float  # and with it
    ratio: float  # live_ms / bare_ms: each process weighs alike (the same steps)
    low: float  # the smallest and largest of the same ratio within one process
    high: float
    closing_ms: float  # median extra time of the train-end hooks with the callback


def paired(framework: str, steps: int, rounds: int, threads: int) -> PairResult:
    """`rounds` processes (which fit takes the first step alternates), summarised."""
    runs = [measure(framework, steps, index % 2 == 1, threads) for index in range(rounds)]
    ratios = [sum(run["live"]) / sum(run["bare"]) for run in runs]
    bare = sum(sum(run["bare"]) for run in runs) / sum(len(run["bare"]) for run in runs)
    live = sum(sum(run["live"]) for run in runs) / sum(len(run["live"]) for run in runs)
    return PairResult(
        bare_ms=1000 * bare, live_ms=1000 * live, ratio=live / bare,
        low=min(ratios), high=max(ratios),
        closing_ms=1000 * stats.median(run["live_closing"] - run["bare_closing"]
                                       for run in runs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="processes per framework")
    p.add_argument("--steps", type=int, default=4 * LOG_EVERY + 1,
                   help="Lightning steps per fit")
    p.add_argument("--hf-steps", type=int, default=4 * LOG_EVERY + 1,
                   help="transformers steps per fit")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every variant (see bench/overhead.py)")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--logdir", help=argparse.SUPPRESS)
    p.add_argument("--live-first", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if min(args.steps, args.hf_steps) < 2:
        p.error("a fit needs at least 2 steps: the first one is not timed")

    if args.child:  # a child process: one paired measurement
        print(json.dumps(child(args.child, args.steps, args.live_first, args.logdir)))
        return 0

    results = {framework: paired(framework, steps, args.rounds, args.threads)
               for framework, steps in (("lightning", args.steps),
                                        ("transformers", args.hf_steps))}
    print(f"\nframework callbacks' overhead: Lightning, smallcnn on mnist5k, batch 64, "
          f"{args.steps} steps; transformers, BERT-tiny, batch {BERT_BATCH} x {SEQUENCE} "
          f"tokens, {args.hf_steps} steps; LiveTrainingCallback on SQLite, log_every "
          f"{LOG_EVERY}; {args.threads} torch thread(s); {args.rounds} processes, each "
          "fitting with and without the callback in turns of one step")
    print(f"{'framework':<13} {'bare ms/step':>13} {'live ms/step':>13} {'x without':>10} "
          f"{'per process':>14} {'closing +ms':>12}")
    for framework, r in results.items():
        print(f"{framework:<13} {r.bare_ms:>13.2f} {r.live_ms:>13.2f} {r.ratio:>10.3f} "
              f"{r.low:>7.3f}-{r.high:.3f} {r.closing_ms:>12.1f}")
    print(f"reproduce: python -m bench.frameworks --rounds {args.rounds} --steps {args.steps} "
          f"--hf-steps {args.hf_steps} --threads {args.threads}")
    return budget.report([
        budget.Verdict(f"{framework} callback overhead, x without it", r.ratio,
                       budget.OVERHEAD_RATIO, "x")
        for framework, r in results.items()])


if __name__ == "__main__":
    raise SystemExit(main())
