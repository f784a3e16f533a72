"""Child-process entry: ``python -m bench.suite.worker module:function params.json result.json``.

Runs ``bench.suite.<module>.<function>(params)`` and writes the returned dict as JSON; an
exception is written as ``{"error": ..., "traceback": ...}``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    target, params_path, result_path = argv
    module_name, _, func_name = target.partition(":")
    params = json.loads(Path(params_path).read_text())
    from bench.suite.common import apply_threads, peak_rss_bytes, quiet_logs

    quiet_logs()
    apply_threads(params.get("threads"))
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.suite.{module_name}")
        result = getattr(module, func_name)(params)
    except BaseException as exc:  # noqa: BLE001 - reported in the result, the suite goes on
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(result["traceback"], file=sys.stderr)
    result.setdefault("child_wall_s", round(time.perf_counter() - start, 3))
    result.setdefault("child_peak_rss_mib", round(peak_rss_bytes() / 2**20, 1))
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
