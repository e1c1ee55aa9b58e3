"""Watch and steer any PyTorch training loop live, through a database.

    from livetrain import LiveRun

The package has three parts: `livetrain.trainer` (the side that runs in your training
process: LiveRun, telemetry, diagnostics, checkpoints), `livetrain.db` (the store and
the database contract, the only code with SQL) and `livetrain.board` (the Dash board).
`livetrain.playground` holds what `train.py` trains: the CNNs and datasets of the demo.
"""

from livetrain.trainer.resuming import ResumeRefusedError
from livetrain.trainer.run import LiveRun

__all__ = ["LiveRun", "ResumeRefusedError"]
__version__ = "0.2.0"
