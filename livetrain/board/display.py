"""Text from the database, shown so that no row can freeze a viewer's page.

Names and tags written through the board or the Store are short (db/store.py), but
any SQL client can write a 100 KB name; rendered whole in a dropdown, a header or a
legend it hangs or crashes the browser tab. The board shows at most NAME_SHOWN /
TAG_SHOWN characters and puts the text on hover (a `title`, itself capped at
TITLE_MAX, which is still the full text of every name the Store accepts).
"""

from __future__ import annotations

from typing import Any

from dash import html

NAME_SHOWN = 80  # characters of a run name in labels, headers and tables
TAG_SHOWN = 40  # characters of a tag (the Store's own limit)
TAGS_SHOWN = 20  # tags per run (the Store's own limit)
TITLE_MAX = 5000  # characters on hover


def shorten(text: Any, limit: int) -> str:
    """`text` as a string of at most `limit` characters, an ellipsis marking a cut."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_tags(tags: Any) -> list[str]:
    """The tags to show, each shortened; a non-list (SQL can write any JSON) shows none."""
    if not isinstance(tags, list):
        return []
    return [shorten(tag, TAG_SHOWN) for tag in tags[:TAGS_SHOWN]]


def text_span(text: Any, limit: int, **props: Any) -> html.Span:
    """A span with `text` shortened and the text on hover."""
    return html.Span(shorten(text, limit), title=shorten(text, TITLE_MAX), **props)
