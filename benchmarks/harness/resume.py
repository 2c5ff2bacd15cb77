"""Resume, shard, merge: a benchmark longer than one time limit, or spread over processes.

* resume: an earlier run's JSON (``--resume``) gives the rows not to measure again;
* shard (``--shard i/n``): of the rows left to measure, in run order, this process measures
  every n-th from the i-th (n processes side by side, with a GPU lock);
* merge: the rows of several runs' files put together; a measured row wins over a failed one,
  and else the first file's row wins.

Rows are dicts; a run says which fields make a row's key. A measured row holds ``ms``, a failed
one ``error``; rows taken from a file are marked ``resumed_from`` (the first file they came
from) and name the ``device`` they ran on (rows of files that did not: the file's).
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Iterable, Sequence, Tuple

Shard = Tuple[int, ...]  # () or (i, n)


def parse_shard(text: str) -> Shard:
    """``"i/n"`` -> (i, n) with 0 <= i < n; '' -> (). Anything else exits naming --shard."""
    if not text:
        return ()
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard: expected i/n, got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
    return (i, n)


def mine(todo_index: int, shard: Shard) -> bool:
    """Whether the ``todo_index``-th row left to measure is this shard's."""
    return not shard or todo_index % shard[1] == shard[0]


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def require_same(path: str, old: dict, new: dict, keys: Iterable[str]) -> None:
    """Exits (naming ``path`` and the field) unless ``old`` and ``new`` agree on ``keys`` (as
    JSON has them: tuples are lists)."""
    for key in keys:
        if json.loads(json.dumps(old.get(key))) != json.loads(json.dumps(new.get(key))):
            raise SystemExit(f"--resume {path}: its {key} {old.get(key)!r} differs from this "
                             f"run's {new.get(key)!r}")


def measured(row: dict) -> bool:
    return "ms" in row


def kept_rows(paths: Sequence[str], key: Callable[[dict], tuple], check: Dict[str, object],
              with_errors: bool = False, config: str = "config") -> Dict[tuple, dict]:
    """key -> row of every measured row (``with_errors``: and every failed one) of the files
    ``paths``, a measured row winning over a failed one, else the earlier file's. Each file's
    ``config`` must hold the values of ``check`` (e.g. the batch size) or the run exits."""
    kept: Dict[tuple, dict] = {}
    for path in paths:
        old = load(path)
        require_same(path, old.get(config, {}), check, check)
        device = (old.get("env") or {}).get("device")
        for r in old["rows"]:
            if not (measured(r) or (with_errors and "error" in r)):
                continue
            k = key(r)
            if k in kept and (measured(kept[k]) or not measured(r)):
                continue
            kept[k] = dict(r, resumed_from=r.get("resumed_from", path),
                           device=r.get("device", device))
    return kept
