"""Many rows sent as one JSON parameter: the store's bulk writes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar, TypeVarTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Dialect,
    Select,
    Table,
    Text,
    bindparam,
    cast,
    column,
    func,
    select,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.selectable import Subquery
from sqlalchemy.types import TypeEngine

from poller.store.schema import plain_decimal

Item = TypeVar("Item")
Columns = TypeVarTuple("Columns")


def column_types(table: Table, *names: str) -> dict[str, TypeEngine[Any]]:
    """The types of these columns of ``table``, by name: a JsonRows' columns."""
    return {name: table.c[name].type for name in names}


class JsonRows:
    """Many rows sent as one JSON parameter and read back as a table inside one statement.

    Unpacked in C by the database (``json_each``, ``jsonb_array_elements``) instead of a
    statement or an executemany row per org (why: docs/architecture.md). Each value first goes
    through its column type's own bind processor, so it is stored exactly as a plain INSERT
    would store it.
    """

    def __init__(self, name: str, columns: dict[str, TypeEngine[Any]]) -> None:
        self.name = name
        self.columns = columns

    def table(self, dialect: Dialect) -> Subquery:
        """The rows as a subquery with one column per name (the statement built once per use)."""
        param = bindparam(self.name, type_=Text)
        if dialect.name == "postgresql":
            each = func.jsonb_array_elements(cast(param, postgresql.JSONB)).table_valued(
                column("value", postgresql.JSONB)
            )
            values = [
                cast(each.c.value[index].astext, type_).label(name)
                for index, (name, type_) in enumerate(self.columns.items())
            ]
        else:
            each = func.json_each(param).table_valued("value")
            # json_extract hands back SQLite's own values: text, integers (booleans as 0/1)
            # and NULL, which column affinity stores exactly as bound parameters would be.
            values = [
                type_coerce(func.json_extract(each.c.value, f"$[{index}]"), type_).label(name)
                for index, (name, type_) in enumerate(self.columns.items())
            ]
        return select(*values).subquery(self.name)

    def bind(self, dialect: Dialect, rows: Iterable[Sequence[Any]]) -> dict[str, str]:
        """The parameter for ``rows`` (values in column order)."""
        processors = self._processors(dialect)
        encoded = []
        for row in rows:
            values = list(row)
            for index, processor in processors:
                if values[index] is not None:
                    values[index] = processor(values[index])
            encoded.append(values)
        return {self.name: json.dumps(encoded, default=_json_scalar, separators=(",", ":"))}

    def _processors(self, dialect: Dialect) -> list[tuple[int, Callable[[Any], Any]]]:
        """(column index, bind processor) for the columns whose values need converting."""
        processors: list[tuple[int, Callable[[Any], Any]]] = []
        for index, type_ in enumerate(self.columns.values()):
            processor: Callable[[Any], Any] | None
            processor = type_.dialect_impl(dialect).bind_processor(dialect)
            if processor is None and isinstance(type_, Text):  # text from outside, e.g. names
                processor = _storable_text
            if processor is not None:
                processors.append((index, processor))
        return processors


# NUL, and the halves of UTF-16 surrogate pairs (which are no characters on their own).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable_text(text: str) -> str:
    """Text from outside, with what neither database takes back from JSON stored as U+FFFD.

    NUL: PostgreSQL refuses it in text, SQLite's json_extract cuts the string there. A lone
    surrogate (JSON may write "\\udc80", and Python's json reads it): it has no UTF-8 form,
    so PostgreSQL refuses the whole batch and SQLite stores bytes that every later read of
    the table fails to decode. The Cekura API serves neither (Django's CharField refuses NUL;
    its JSON is UTF-8).
    """
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _json_scalar(value: object) -> str:
    """What bind processors hand back that JSON has no type for (PostgreSQL casts the text)."""
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} as a JSON row value")


# Org ids as rows, for a statement that picks orgs by id.
ORG_IDS = JsonRows("org_ids", {"org_id": BigInteger()})


def among_orgs(
    query: Select[*Columns],
    column_: ColumnElement[int],
    dialect: Dialect,
    org_ids: Iterable[int] | None,
) -> tuple[Select[*Columns], dict[str, str]]:
    """``query`` as is (``org_ids`` None: every org), or restricted to ``column_ IN`` those
    ids; with its parameters. Any number of ids goes as one JSON text: an IN over bound
    values takes a parameter per id, and SQLite caps their number."""
    if org_ids is None:
        return query, {}
    condition = column_.in_(select(ORG_IDS.table(dialect).c.org_id))
    return query.where(condition), ORG_IDS.bind(dialect, ((org_id,) for org_id in org_ids))


def batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
