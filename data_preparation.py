"""The playground's datasets, where the design card put them: `from data_preparation import ...`.

The code lives in the installed package, `livetrain.playground.data`.
"""

from livetrain.playground.data import *  # noqa: F403
