"""A run's task rows as two compact blobs and back: what the run store keeps of an ended run, and
what ``ex.history`` keeps of an older run's rows (``WorkflowRun._pack``).

5,000 row dicts cost a full garbage-collector pass ~0.25 ms to look through, on every pass, for as
long as a run stays in the history, and ~2.5 MB of memory; their log is ~25 KB of bytes the
collector never looks into.
"""

from __future__ import annotations

import base64
import json
import sys
import zlib
from array import array
from itertools import groupby
from operator import itemgetter

SIMPLE_ITEM = -1  # a simple stage's task (item None) in the run store's live_tasks key and in logs

TEXT_COLUMNS = ("stage", "item", "state", "worker", "error")
# One getter per column: a column is read with one C loop that makes no new object per row. A row
# tuple per task (zip(*rows)) set off the cyclic GC every 700 rows, and while the engine's threads
# held many young objects that tripled the writer's CPU.
_TEXT_GETTERS = tuple(itemgetter(key) for key in TEXT_COLUMNS)
_TIME_GETTERS = tuple(itemgetter(key) for key in ("queued", "start", "end"))
LOG_FORMAT = 2  # the task log's layout, kept in its columns (a log without "f" is format 1)


def encode_task_log(rows) -> tuple[bytes, bytes]:
    """An ended run's task rows as two blobs, built column by column in C loops (the writer
    shares the GIL with the engine: its cost per task is what a tiny run pays):

    - columns, JSON (zlib-compressed when over ``COMPRESS_OVER`` bytes): ``f`` format, ``n`` rows;
      ``stage`` and ``state`` as runs ``[value, count]``; ``worker`` as ``[names, codes]`` (the
      codes base64 bytes while there are at most 256 names);
      ``item`` per stage run: ``["r", first]`` for consecutive items, ``None`` for a simple
      stage's task, else the list (``SIMPLE_ITEM`` for None); ``error`` as ``[row, text]`` pairs;
    - times: all queued times, then starts, then ends (NaN for none) as float64 bit patterns,
      each XORed with the one before and stored byte plane by byte plane (``_pack_times``). As
      JSON text 15,000 times took longer than everything else; as plain floats they cost SQLite
      more (a 5 KB blob took ~50 us to write, 0.7 KB ~6 us) than packing them does."""
    n = len(rows)
    stage, item, state, worker, error = (list(map(get, rows)) for get in _TEXT_GETTERS)
    stage_runs = _value_runs(stage)
    names = list(dict.fromkeys(worker))
    columns = {
        "f": LOG_FORMAT,
        "n": n,
        "stage": stage_runs,
        "item": _item_runs(item, stage_runs),
        "state": _value_runs(state),
        "worker": [names, _codes(map({w: i for i, w in enumerate(names)}.__getitem__, worker), len(names))],
        "error": [] if error.count(None) == n else [[i, e] for i, e in enumerate(error) if e is not None],
    }
    text = json.dumps(columns, separators=(",", ":")).encode()
    if len(text) > COMPRESS_OVER:  # zlib costs ~30 us a call whatever the size
        text = zlib.compress(text, 1)
    return text, _pack_times(_time_array(rows))


COMPRESS_OVER = 2048


def _codes(codes, distinct: int):
    """Small ints as one base64 text of bytes when they fit (a JSON list of 5,000 ints took
    ~0.15 ms to write), else the list."""
    return base64.b64encode(bytes(codes)).decode() if distinct <= 256 else list(codes)


def _time_array(rows):
    """All queued times, then starts, then ends, as one float64 array read from the rows straight
    into it: numpy makes None (a task that never started or ended) NaN, and a time is a Unix
    time, never NaN."""
    import numpy as np

    n = len(rows)
    times = np.empty(3 * n, dtype=np.float64)
    for k, get in enumerate(_TIME_GETTERS):
        times[k * n : (k + 1) * n] = np.fromiter(map(get, rows), np.float64, n)
    return times


def _pack_times(times) -> bytes:
    """Times (a float64 array) as their bits, each XORed with the previous one (consecutive
    times share their high bytes: the XOR is mostly zeros), split into byte planes, deflated:
    ~1.2 bytes a time, exact to the bit."""
    import numpy as np

    bits = times.astype("<f8", copy=False).view("<u8")  # little-endian on any machine
    xored = bits.copy()
    xored[1:] ^= bits[:-1]
    planes = xored.view(np.uint8).reshape(-1, 8).T.tobytes()
    packer = zlib.compressobj(1, zlib.DEFLATED, -15)
    return packer.compress(planes) + packer.flush()


def _unpack_times(blob: bytes) -> list:
    import numpy as np

    planes = np.frombuffer(zlib.decompress(blob, -15), dtype=np.uint8)
    xored = np.ascontiguousarray(planes.reshape(8, -1).T).view("<u8").ravel()
    values = np.bitwise_xor.accumulate(xored).view("<f8")
    return [None if v != v else v for v in values.tolist()]  # NaN: no time


def _value_runs(column) -> list:
    return [[value, len(list(group))] for value, group in groupby(column)]


def _item_runs(items: list, stage_runs: list) -> list:
    out: list = []
    at = 0
    for _, count in stage_runs:
        part = items[at : at + count]
        first = part[0]
        if first is not None and part == list(range(first, first + count)):
            out.append(["r", first])
        elif part.count(None) == count:
            out.append(None)
        else:
            out.append([SIMPLE_ITEM if i is None else i for i in part])
        at += count
    return out


def decode_task_log(columns: bytes, times: bytes) -> list[dict]:
    """The task rows ``encode_task_log`` wrote (item None again for a simple stage's task); reads
    format 1 logs too (every column a list, times as (queued, start, end) per row)."""
    cols = json.loads(columns if columns[:1] == b"{" else zlib.decompress(columns))
    if "f" not in cols:
        flat = array("d")
        flat.frombytes(zlib.decompress(times))
        if sys.byteorder != "little":
            flat.byteswap()
        return _decode_format_1(cols, [None if v != v else v for v in flat])
    values = _unpack_times(times)
    n = cols["n"]
    stage = _expand_runs(cols["stage"])
    item: list = []
    for (_, count), part in zip(cols["stage"], cols["item"]):
        if part is None:
            item.extend([None] * count)
        elif part[0] == "r":
            item.extend(range(part[1], part[1] + count))
        else:
            item.extend(None if i == SIMPLE_ITEM else i for i in part)
    names, codes = cols["worker"]
    worker = [names[c] for c in (base64.b64decode(codes) if isinstance(codes, str) else codes)]
    error: list = [None] * n
    for i, text in cols["error"]:
        error[i] = text
    return [
        dict(zip(_ROW_KEYS, row))
        for row in zip(
            stage,
            item,
            _expand_runs(cols["state"]),
            worker,
            values[:n],
            values[n : 2 * n],
            values[2 * n :],
            error,
        )
    ]


_ROW_KEYS = ("stage", "item", "state", "worker", "queued", "start", "end", "error")


def _expand_runs(runs: list) -> list:
    out: list = []
    for value, count in runs:
        out.extend([value] * count)
    return out


def _decode_format_1(cols: dict, values: list) -> list[dict]:
    rows = []
    for i, (stage, item, state, worker, error) in enumerate(zip(*(cols[name] for name in TEXT_COLUMNS))):
        queued, start, end = values[3 * i : 3 * i + 3]
        rows.append(
            {
                "stage": stage,
                "item": None if item == SIMPLE_ITEM else item,
                "state": state,
                "worker": worker,
                "queued": queued,
                "start": start,
                "end": end,
                "error": error,
            }
        )
    return rows
