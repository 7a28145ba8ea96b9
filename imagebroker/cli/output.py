"""How the command line prints: to a terminal, tables that choose their columns by its width; to a pipe or
file, every column and no line ever wrapped. Nothing printed is read as Rich markup unless this module
styles it, so `FLUX.1 [dev]` and `'imagebroker[local]'` print as they are."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
PIPE_WIDTH = 1_000_000   # what a table may take when nobody's terminal is there to fit
WRAP_MIN = 20            # a free-text column folds no narrower than this


def unlimited_when_piped() -> None:
    """A console writing to a pipe or file gets no width: lines are never cut or wrapped there."""
    for c in (console, err_console):
        if not c.is_terminal:
            c.width = PIPE_WIDTH


def plain_decimal(value: Decimal) -> str:
    """A Decimal as a plain number, never in exponent form (`0E-9` is `0`, `1.500000000` is `1.5`)."""
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def usd(value: Decimal | None, places: int = 6) -> str:
    return "unpriced" if value is None else f"${value:.{places}f}"


def _default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return plain_decimal(o)
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def styled(text: str, style: str | None = None) -> Text:
    """`text` as it is (no markup read from it), in `style`."""
    return Text(text, style=style or "")


@dataclass(frozen=True)
class Col:
    """A table column. `hide` orders what goes first on a narrow terminal (0: never hidden, then the
    highest first); `wrap` lets free text fold over lines instead (every other column keeps one line, so
    a number or a name is never cut)."""

    name: str
    hide: int = 0
    right: bool = False
    wrap: bool = False


Cell = str | Text


def _table(title: str, cols: Sequence[Col], rows: Sequence[Sequence[Cell]], keep: list[int],
           bold_last: bool, squeeze: bool = False) -> Table:
    table = Table(title=styled(title), title_justify="left", box=box.SIMPLE_HEAD)
    for i in keep:
        c = cols[i]
        widest = max([len(c.name), *(len(str(r[i])) for r in rows)])
        table.add_column(styled(c.name), justify="right" if c.right else "left", no_wrap=not c.wrap,
                         overflow="fold", min_width=min(widest, WRAP_MIN) if c.wrap and not squeeze else None)
    for n, row in enumerate(rows):
        table.add_row(*(row[i] if isinstance(row[i], Text) else styled(row[i]) for i in keep),
                      style="bold" if bold_last and n == len(rows) - 1 else None)
    return table


def _natural(table: Table, *, minimum: bool = False) -> int:
    """The table's width with no terminal to fit (`minimum`: with its free text folded)."""
    found = Measurement.get(console, console.options.update_width(PIPE_WIDTH), table)
    return found.minimum if minimum else found.maximum


def print_table(title: str, cols: Sequence[Col], rows: Sequence[Sequence[Cell]], *, wide: bool = False,
                bold_last: bool = False) -> None:
    """Print a table. On a terminal, without `wide`, columns are hidden (highest `hide` first) until the
    rest fits, and a line says which; piped, every column prints at its full width."""
    keep = list(range(len(cols)))
    hidden: list[str] = []
    fit = console.is_terminal and not wide
    while True:
        table = _table(title, cols, rows, keep, bold_last)
        if not fit or _natural(table, minimum=True) <= console.width:
            break
        droppable = [i for i in keep if cols[i].hide > 0]
        if not droppable:   # what is left folds its free text as narrow as it must
            table = _table(title, cols, rows, keep, bold_last, squeeze=True)
            break
        gone = max(droppable, key=lambda i: (cols[i].hide, i))
        keep.remove(gone)
        hidden.insert(0, cols[gone].name)
    if wide and console.is_terminal:   # at its own width, however narrow: the terminal wraps what it must
        options = console.options.update_width(max(console.width, _natural(table)))
        for line in console.render_lines(table, options, pad=False, new_lines=False):
            console.print(Segments(line), soft_wrap=True)
    else:
        console.print(table)
    if hidden:
        console.print(styled(f"hidden to fit {console.width} columns: {', '.join(hidden)} (--wide shows all)",
                             "dim"), soft_wrap=False)
