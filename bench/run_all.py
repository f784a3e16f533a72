"""Run the benchmark suite and write a JSON report, a markdown summary and PNG plots.

    .venv/bin/python bench/run_all.py                      # full run (~20-25 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick              # smoke run, small counts (< 3 min)
    .venv/bin/python bench/run_all.py --only latency,fit   # some sections
    .venv/bin/python bench/run_all.py --only quality --merge   # redo one section, keep the others
    .venv/bin/python bench/run_all.py --out /tmp/bench     # somewhere else than bench/out

Sections (each runs in its own process; see bench/README.md): latency, fit, coreset, memory,
quality, gpu. Writes ``report.json``, ``summary.md`` and ``*.png`` into the output folder and
prints the summary. Exit code 0 even when a target fails (it is a measurement, not a test);
1 when a section crashed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.suite.common import load_avg, machine_info, run_child, say  # noqa: E402
from bench.suite.report import markdown, plots, targets  # noqa: E402

SECTIONS = ("latency", "fit", "coreset", "memory", "quality", "gpu")
SECTION_TIMEOUT_S = {"full": 3600, "quick": 900}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="small counts and sizes: a smoke run under 3 minutes")
    ap.add_argument("--only", action="append", default=[], metavar="SECTION",
                    help=f"run only these sections (comma-separated or repeated): {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="output folder (default bench/out)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections of an existing report.json in --out (with --only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch / faiss threads in every child (default: torch's default)")
    args = ap.parse_args(argv)
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in only] if only else list(SECTIONS)
    return args


def _write(report: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    report["targets"] = targets(report)
    written, problems = plots(report, out)
    report["plots"] = written
    report["plot_problems"] = problems
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report, written)
    if problems:
        text += "\n" + "\n".join(f"- plot problem: {p}" for p in problems) + "\n"
    (out / "summary.md").write_text(text)
    return text, written


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info()
    if args.threads:
        machine["torch_threads"] = f"{args.threads} (--threads)"
    say("suite", f"{mode} run of {', '.join(args.sections)} -> {out}")
    say("suite", f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, torch {machine['torch']} "
                 f"({machine['torch_threads']} threads), CUDA {machine['cuda_device'] or 'none'}, "
                 f"load {machine['load_avg']}")
    report: dict[str, Any] = {
        "suite": 1, "mode": mode, "machine": machine, "started": machine["time"],
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "bench/run_all.py",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "sections": {},
    }
    previous = out / "report.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        for name, result in old.get("sections", {}).items():
            if name not in args.sections:
                result["from_earlier_run"] = old.get("started")
                report["sections"][name] = result
    crashed = False
    for name in args.sections:
        module = importlib.import_module(f"bench.suite.{name}")
        params = dict(module.QUICK if args.quick else module.FULL)
        params["threads"] = args.threads
        say("suite", f"section {name} ...")
        before, t0 = load_avg(), time.perf_counter()
        result = run_child(f"{name}:run", params, timeout=SECTION_TIMEOUT_S[mode])
        result.update(seconds=round(time.perf_counter() - t0, 1), load_avg_before=before, load_avg_after=load_avg(),
                      params=params)
        crashed |= "error" in result
        say("suite", f"section {name} done in {result['seconds']:.0f} s"
                     + (f": FAILED {result['error']}" if "error" in result else ""))
        report["sections"][name] = result
        report["total_s"] = round(time.perf_counter() - started, 1)
        report["load_avg_after"] = load_avg()
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))  # partial, in case
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_avg_after"] = load_avg()
    text, _ = _write(report, out)
    print(text)
    say("suite", f"wrote {out / 'report.json'}, {out / 'summary.md'} and {len(report['plots'])} plots "
                 f"in {report['total_s'] / 60:.1f} min")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
