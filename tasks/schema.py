"""Declared schemas of the input tables."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int", "float", "str", "timestamp"
    required: bool = True  # must be present in the file


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _cols(spec: str) -> tuple[Column, ...]:
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(Column(name, kind))
    return tuple(out)


FLIGHTS = TableSchema(
    "flights",
    _cols(
        "year:int month:int day:int dep_time:float sched_dep_time:int dep_delay:float "
        "arr_time:float sched_arr_time:int arr_delay:float carrier:str flight:int tailnum:str "
        "origin:str dest:str air_time:float distance:float hour:int minute:int time_hour:timestamp"
    ),
)
WEATHER = TableSchema(
    "weather",
    _cols(
        "origin:str year:int month:int day:int hour:int temp:float dewp:float humid:float "
        "wind_dir:float wind_speed:float wind_gust:float precip:float pressure:float visib:float "
        "time_hour:timestamp"
    ),
)
PLANES = TableSchema(
    "planes",
    _cols(
        "tailnum:str year:float type:str manufacturer:str model:str engines:int seats:int "
        "speed:float engine:str"
    ),
)
AIRLINES = TableSchema("airlines", _cols("carrier:str name:str"))
AIRPORTS = TableSchema(
    "airports", _cols("faa:str name:str lat:float lon:float alt:float tz:float dst:str tzone:str")
)

TABLES: dict[str, TableSchema] = {t.name: t for t in (FLIGHTS, WEATHER, PLANES, AIRLINES, AIRPORTS)}

# Columns only known after the aircraft has left the gate. They may be read
# (the label comes from arr_delay) but must never be model features.
POST_DEPARTURE = frozenset({"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"})
