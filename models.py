"""The playground's CNNs, where the design card put them: `from models import build_model`.

The code lives in the installed package, `livetrain.playground.models`, so that
`python -m livetrain.train` and the tests find it from any directory.
"""

from livetrain.playground.models import *  # noqa: F403
