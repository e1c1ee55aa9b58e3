"""What every callback needs: the Store for writes and the board's read queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dash import no_update

from livetrain.db.board_queries import BoardQueries
from livetrain.db.store import Store, describe_url


@dataclass(frozen=True)
class BoardContext:
    store: Store
    queries: BoardQueries

    @classmethod
    def for_store(cls, store: Store) -> BoardContext:
        return cls(store, BoardQueries(store.engine))

    @property
    def db_label(self) -> str:
        """The database URL with any password masked."""
        return describe_url(self.store.url)


def or_no_update(value: Any) -> Any:
    """The value for an output, or Dash's no_update when there is none (None)."""
    return no_update if value is None else value
