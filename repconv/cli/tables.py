"""Tables that stay readable in a narrow terminal (80 columns).

Rich squeezes an over-wide table by cutting cells to ``0.7…``. :func:`print_table` instead keeps
every right-aligned (numeric) column at least as wide as its longest word, so numbers are never cut,
wraps headers at their spaces, lets left-aligned text (names) wrap onto more lines, and when that
is not enough, drops the vertical rules and finally splits the columns into two tables that both
repeat the leading key columns.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

_FLOOR = 8  # a text column is never squeezed below this (or its longest header word)


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def _longest_line(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def _widths(table: Table, fold_words: bool) -> tuple[list[int], list[int]]:
    """(natural width, least width) of every column's content (no padding). Text columns may go
    below their longest word (folding it) only with ``fold_words``."""
    natural, least = [], []
    for col in table.columns:
        cells = [_plain(c) for c in col._cells]
        header = _plain(col.header)
        body_natural = max((_longest_line(c) for c in cells), default=0)
        body_word = max((_longest_word(c) for c in cells), default=0)
        head_word = _longest_word(header)
        nat = max(body_natural, _longest_line(header))
        if col.justify == "right":  # numbers: never narrower than the longest one
            low = max(body_word, head_word, 1)
        elif fold_words:
            low = max(min(nat, _FLOOR), head_word, 1)
        else:
            low = max(body_word, head_word, 1)
        natural.append(nat)
        least.append(min(low, nat) if nat else 1)
    return natural, least


def _rendered_width(table: Table, widths: Sequence[int]) -> int:
    probe = copy.deepcopy(table)
    for col, w in zip(probe.columns, widths, strict=True):
        col.width, col.min_width, col.max_width = w, None, None
    return Console(width=100_000, file=None, highlight=False).measure(probe).maximum


def _fit_widths(table: Table, width: int, fold_words: bool = True) -> list[int] | None:
    """Column widths that fit ``width`` with this table's borders, or None."""
    natural, least = _widths(table, fold_words)
    overhead = _rendered_width(table, [1] * len(natural)) - len(natural)
    room = width - overhead
    if sum(least) > room:
        return None
    widths = list(natural)
    # shrink the widest shrinkable column one step at a time (water-filling), never below its least
    while sum(widths) > room:
        i = max((j for j in range(len(widths)) if widths[j] > least[j]), key=lambda j: widths[j])
        widths[i] -= 1
    return widths


def _apply(table: Table, widths: Sequence[int]) -> Table:
    for col, w in zip(table.columns, widths, strict=True):
        col.width, col.min_width, col.max_width = w, None, None
        col.no_wrap = False
        col.overflow = "fold"
    return table


def _compact(table: Table) -> Table:
    t = copy.deepcopy(table)
    t.box = box.SIMPLE_HEAD
    t.show_edge = False
    t.padding = (0, 0)  # the box's blank vertical rule is the one space between columns
    t.pad_edge = False
    return t


def _split(table: Table, keys: int, width: int, fold: bool) -> list[Table] | None:
    """The columns in two (or more) tables of ``table``'s rows, each starting with the ``keys`` key
    columns; text is folded inside words only with ``fold``."""
    cols = table.columns
    if keys <= 0 or keys >= len(cols) - 1:
        return None
    head, rest = list(range(keys)), list(range(keys, len(cols)))
    for cut in range(len(rest) - 1, 0, -1):  # as many columns as fit in the first table
        first = _subset(table, head + rest[:cut])
        widths = _fit_widths(first, width, fold)
        if widths is None:
            continue
        second = _subset(table, head + rest[cut:])
        second.title = None
        tail_widths = _fit_widths(second, width, fold)
        tail = [_apply(second, tail_widths)] if tail_widths is not None else _split(second, keys, width, fold)
        return None if tail is None else [_apply(first, widths), *tail]
    return None


def _subset(table: Table, indexes: list[int]) -> Table:
    t = copy.deepcopy(table)
    t.columns = [t.columns[i] for i in indexes]
    for i, col in enumerate(t.columns):
        col._index = i
    return t


def fit_table(table: Table, width: int, keys: int = 1) -> list[Table]:
    """``table`` made to fit ``width`` columns (see the module docstring); more than one table when
    the columns had to be split, each repeating the first ``keys`` columns."""
    if Console(width=100_000, highlight=False).measure(table).maximum <= width:
        return [table]
    for candidate, fold in ((table, False), (_compact(table), False)):
        widths = _fit_widths(candidate, width, fold)
        if widths is not None:
            return [_apply(copy.deepcopy(candidate), widths)]
    # No fit without breaking a word. One table that breaks a few letters (onnxrunt|ime) keeps each
    # row's figures together; when names would be shredded, two tables that keep words whole.
    folded = None
    for candidate in (table, _compact(table)):
        widths = _fit_widths(candidate, width, True)
        if widths is not None:
            folded = _apply(copy.deepcopy(candidate), widths)
            break
    if folded is not None and _broken_letters(folded) <= _MILD_FOLD:
        return [folded]
    parts = _split(_compact(table), keys, width, fold=False)
    if parts is not None and len(parts) <= 2:
        return parts
    return [folded] if folded is not None else parts or _split(_compact(table), keys, width, fold=True) or [table]


_MILD_FOLD = 4  # letters moved to the next line, summed over the columns, that still read fine


def _broken_letters(table: Table) -> int:
    """How many letters of the longest words do not fit their (fixed) column widths."""
    total = 0
    for col in table.columns:
        longest = max([_longest_word(_plain(c)) for c in col._cells] + [_longest_word(_plain(col.header))])
        total += max(0, longest - (col.width or longest))
    return total


def print_table(table: Table, console: Console, keys: int = 1) -> None:
    """Print ``table`` on ``console`` within its width (:func:`fit_table`)."""
    for t in fit_table(table, console.width, keys):
        console.print(t)



