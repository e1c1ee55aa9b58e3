"""A user's own loop on two torchrun ranks (DDP over gloo) that counts, per step, the
blocking collectives it makes: tests/test_torchrun.py runs it and steers it with SQL.

Each rank prints, at the end, one JSON line: the steps that made a blocking collective,
with how many. The loop is the API's ten lines around a DistributedDataParallel MLP.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn

from bench.counting import count_blocking_collectives
from livetrain import LiveRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.02)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(rank)  # each rank its own shard
    blocking: dict[int, int] = {}
    with LiveRun(ddp, optimizer, db=args.db, name="ddp-steps", log_every=args.log_every,
                 checkpoint_dir=args.checkpoint_dir) as run:
        while not run.should_stop:
            x = torch.randn(32, 20, generator=data)
            y = torch.randint(0, 4, (32,), generator=data)
            with count_blocking_collectives() as counted:
                out = ddp(x)
                loss = nn.functional.cross_entropy(out, y)
                run.optimizer.zero_grad()
                loss.backward()
                run.optimizer.step()
                run.step(loss, outputs=out, targets=y)
            if counted.count:
                blocking[run.global_step] = counted.count
            time.sleep(args.sleep)
    print(json.dumps({"rank": rank, "steps": run.global_step, "blocking": blocking}),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
