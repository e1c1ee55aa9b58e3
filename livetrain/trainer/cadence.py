"""Which logs measure every layer: the per-layer telemetry's own cadence.

A log's statistics row (loss, accuracy, lr, throughput) is cheap; its per-layer
telemetry is not: activations, gradient norms, update ratios and three histograms a
layer cost a few milliseconds, which a 1 ms GPU step cannot hide at every log (a
3-layer MLP logging every 50 steps spent more on it than on its 49 other steps).

By default (`telemetry_every=1`) every log measures the layers: the health rules that
read them (dead units, vanishing or exploding activations, update ratios, exploding
gradients) need a run of logs to tell a condition from one odd batch, and judged on
the playground's pathologies they missed three of them when most logs went without.
`telemetry_every="auto"` is for steps too fast for that: it measures the layers at
every one of a run's first WARMUP_LOGS logs, where a bad start shows and a short run is
all of them; at every full log (an epoch's end, the last one); and otherwise when the
wall time since the last measured log is at least the measurement's own cost over
TELEMETRY_SHARE, so that the layers take about 1 % of the run's time (the layer rules
then see fewer logs, and find what they find later in steps). An integer n measures
every n-th log, and the full ones.

The measured cost is the probe's work at a log (gradient norms and weights before the
update, ratios after it, the rows and histograms); the forward hooks that capture
activations, and a compiled model's eager pass, are not in it.
"""

from __future__ import annotations

import time

TELEMETRY_SHARE = 0.01  # the run's time the layers may take, under "auto"
WARMUP_LOGS = 10  # the first logs that always measure the layers, under "auto"


def check_telemetry_every(every: int | str) -> int | str:
    """`every` when it is "auto" or a whole number of logs of at least 1; ValueError
    otherwise."""
    if every == "auto" or (isinstance(every, int) and not isinstance(every, bool)
                           and every >= 1):
        return every
    raise ValueError(f"telemetry_every must be 'auto' or a number of logs of at least 1, "
                     f"got {every!r}")


class TelemetryCadence:
    """The cadence of one run: how many logs it has written and what the last
    measurement of its layers cost."""

    def __init__(self, every: int | str = 1) -> None:
        self.every = check_telemetry_every(every)
        self.logs = 0  # logs written so far
        self.cost = 0.0  # seconds the last measured log's telemetry took
        self.measured_at = time.perf_counter()
        self.skipped = 0  # logs written without layer telemetry

    def due(self, full: bool) -> bool:
        """Whether the coming log measures the layers (`full`: an epoch's end or the
        last log)."""
        if full:
            return True
        if self.every == "auto":
            return self.logs < WARMUP_LOGS or \
                time.perf_counter() - self.measured_at >= self.cost / TELEMETRY_SHARE
        return self.logs % self.every == 0

    def logged(self, measured: bool, cost: float) -> None:
        """A log was written, with its layers measured (at `cost` seconds) or not."""
        self.logs += 1
        if measured:
            self.cost, self.measured_at = cost, time.perf_counter()
        else:
            self.skipped += 1
