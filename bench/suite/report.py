"""The suite's outputs: targets with pass/fail, the markdown summary and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PASS, FAIL = "PASS", "FAIL"
DOORS = ("forward", "in-process", "ZeroMQ", "REST", "in-process raw", "ZeroMQ raw")


# --- targets -----------------------------------------------------------------------------------

def _target(name: str, measured: str, status: str, note: str = "") -> dict[str, str]:
    return {"target": name, "measured": measured, "status": status, "note": note}


def _missing(section: str, sections: dict[str, Any]) -> str | None:
    """Why a section's numbers are absent, or None when they are there."""
    if section not in sections:
        return f"not measured: section {section} not run"
    if "error" in sections[section]:
        return f"not measured: section {section} failed ({sections[section]['error'][:120]})"
    return None


def targets(report: dict[str, Any]) -> list[dict[str, str]]:
    sections = report.get("sections", {})
    quick = report.get("mode") == "quick"
    rows: list[dict[str, str]] = []

    why = _missing("coreset", sections)
    t = None if why else sections["coreset"].get("target", {})
    if t and "error" in t:
        why = f"not measured: coreset target failed ({t['error'][:120]})"
    names = ("coreset 200 000 x 384 at 10 % <= 10 s",
             "coreset >= 50x faster than exact greedy k-center (numpy, full dims)",
             "coreset covering radius <= 1.1x exact greedy's")
    if why or not t:
        rows += [_target(n, "-", why or "not measured") for n in names]
    else:
        sub = t["subset"]
        real = t.get("real_384") or {}
        lite = t.get("real_subset") or {}
        small = " (quick: small banks, speed-up understated)" if quick else ""
        synth_time = f"synthetic {t['n']} x {t['d']}: {t['approx_s']:.2f} s"
        synth_speed = (f"synthetic {t['n']} x {t['d']}: exact estimated from {t['exact_probe_picks']} picks "
                       f"{t['exact_full_estimated_s']:.0f} s = {t['speedup_full_estimated']:.0f}x{small}")
        synth_radius = f"synthetic {sub['rows']}-row subset: {sub['radius_ratio']:.3f}x"
        if "radius_ratio" in lite:
            synth_radius += f"; Lite0 152-dim bottle features ({lite['rows']} rows): {lite['radius_ratio']:.3f}x"
        if "radius_ratio" in real:
            bank = f"real {real['rows']} x {real['d']}"
            rows.append(_target(names[0], f"{real['approx_s']:.2f} s ({bank}, k={real['k']})",
                                PASS if real["approx_s"] <= 10 and t["approx_s"] <= 10 else FAIL, synth_time))
            rows.append(_target(names[1], f"{real['speedup']:.1f}x ({bank}, both run in full: exact "
                                          f"{real['exact_s']:.1f} s / engine {real['approx_s']:.2f} s)",
                                PASS if real["speedup"] >= 50 else FAIL, synth_speed))
            rows.append(_target(names[2], f"{real['radius_ratio']:.3f}x ({real['radius_approx']:.3f} / "
                                          f"{real['radius_exact']:.3f}, {bank})",
                                PASS if real["radius_ratio"] <= 1.1 else FAIL, synth_radius))
        else:
            why = f"not measured on real features: {real.get('error', 'bottle data not found')}"
            rows += [_target(names[0], "-", f"{why}; {synth_time}"), _target(names[1], "-", f"{why}; {synth_speed}"),
                     _target(names[2], "-", f"{why}; {synth_radius}")]

    name = "infer through ZeroMQ p50 <= 1.1x backbone forward p50 (same image)"
    why = _missing("latency", sections)
    if why:
        rows.append(_target(name, "-", why))
    else:
        for c in sections["latency"]["configs"]:
            label = f"{c['backbone']} @ {c['side']}"
            if "error" in c:
                rows.append(_target(f"{name}: {label}", "-", f"not measured: {c['error'][:120]}"))
                continue
            doors = c["doors"]
            fwd = doors["forward"]["p50"]
            for door, form in (("ZeroMQ", "PNG in, PNG heatmap"), ("ZeroMQ raw", "raw RGB in, no heatmap")):
                if door not in doors:
                    rows.append(_target(f"{name}: {label}, {form}", "-", "not measured: ZeroMQ door unavailable"))
                    continue
                ratio = doors[door]["p50"] / fwd
                rows.append(_target(f"{name}: {label}, {form}",
                                    f"{ratio:.2f}x ({doors[door]['p50']:.1f} / {fwd:.1f} ms)",
                                    PASS if ratio <= 1.1 else FAIL))

    names = ("GPU: DINOv2 ViT-S/14 @ 448 infer p50 in-process <= 5 ms", "GPU: fit of 200 images <= 3 s")
    why = _missing("gpu", sections)
    g = None if why else sections["gpu"]
    if why or not g:
        rows += [_target(n, "-", why or "not measured") for n in names]
    elif not g.get("measured"):
        rows += [_target(n, "-", g.get("status", "not measured: no CUDA device")) for n in names]
    else:
        p50 = g["infer"]["in-process raw"]["p50"]
        rows.append(_target(names[0], f"{p50:.2f} ms (raw RGB in, no heatmap; PNG/PNG "
                                      f"{g['infer']['in-process']['p50']:.2f} ms) on {g['device']}",
                            PASS if p50 <= 5 else FAIL))
        rows.append(_target(names[1], f"{g['fit_wall_s']:.2f} s ({g['fit_images']} images, {g['precision']})",
                            PASS if g["fit_wall_s"] <= 3 else FAIL))
    return rows


# --- markdown ----------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    m = report["machine"]
    s = report["sections"]
    lines = [f"# Benchmark report ({report['mode']} run)", ""]
    lines += [
        f"- machine: {m['platform']}; CPU {m['cpu_model']}; {m['cpu_count']} cores "
        f"({m['cpus_usable']} usable); RAM {m['ram_gib']} GiB",
        f"- torch {m['torch']} ({m['torch_threads']} threads), faiss {m['faiss']}, numpy {m['numpy']}, "
        f"python {m['python']}; CUDA: {m['cuda_device'] or 'none (torch.cuda.is_available() is False)'}",
        f"- started {report['started']}, took {report.get('total_s', 0) / 60:.1f} min; load average before "
        f"{m['load_avg']}, after {report.get('load_avg_after')} (other processes on these cores inflate "
        "every figure; compare runs only at similar load)",
        f"- command: `{report['command']}`",
        "",
    ]
    load, threads = (m.get("load_avg") or [0])[0], m.get("torch_threads")
    if isinstance(threads, int) and m.get("cpus_usable") and load + threads > m["cpus_usable"] + 0.9:
        lines += [f"> WARNING: load average {load} before the run plus {threads} torch threads exceeds the "
                  f"{m['cpus_usable']} usable cores: oversubscribed OpenMP threads stall, so CPU timings "
                  "here are overstated and noisy. Rerun on an idle machine (or with `--threads 1`).", ""]
    if report["mode"] == "quick":
        lines += ["> Quick run: small counts and sizes to check the suite works; the targets below are "
                  "indicative only. Run without `--quick` for the numbers to report.", ""]

    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "result", "note"],
                    [[t["target"], t["measured"], t["status"], t["note"]] for t in report["targets"]])
    lines.append("")

    for section in s:
        if "error" in s[section]:
            lines += [f"## {section}", "", f"FAILED: {s[section]['error']}", ""]
    if "latency" in s and "configs" in s["latency"]:
        lines += _latency_md(s["latency"])
    if "fit" in s and "rows" in s["fit"]:
        lines += _fit_md(s["fit"])
    if "coreset" in s and "rows" in s["coreset"]:
        lines += _coreset_md(s["coreset"])
    if "memory" in s and "rows" in s["memory"]:
        lines += _memory_md(s["memory"])
    if "quality" in s and "rows" in s["quality"]:
        lines += _quality_md(s["quality"])
    if "gpu" in s and "error" not in s["gpu"]:
        g = s["gpu"]
        lines += ["## GPU (CUDA)", ""]
        if not g.get("measured"):
            lines += [f"{g.get('status')}. The code path exists: `bench/suite/gpu.py` builds the engine with "
                      "`Settings(device=\"cuda\")` (bf16, batch 16, torch kNN bank) and times DINOv2 at 448.", ""]
        else:
            lines += _table(["call", "p50 ms", "p99 ms", "n"],
                            [[k, v["p50"], v["p99"], v["n"]] for k, v in g["infer"].items()])
            lines += ["", f"fit of {g['fit_images']} images: {g['fit_wall_s']:.2f} s wall; stages (ms): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in g["fit_timings_ms"].items()), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Section wall times: " + ", ".join(
        f"{k} {v.get('seconds', 0):.0f} s" + (f" (from the run of {v['from_earlier_run']}, kept by --merge)"
                                             if v.get("from_earlier_run") else "") for k, v in s.items()), ""]
    return "\n".join(lines)


def _latency_md(sec: dict[str, Any]) -> list[str]:
    lines = ["## Infer latency per ROI (ms, p50 / p99)", "",
             "One calibrated model per row, the same ROI image (a defective bottle at the input side) "
             "through every path, calls interleaved. `forward` = backbone alone; `in-process`/`ZeroMQ`/`REST` = "
             "PNG in + PNG heatmap out; `raw` = RGB array in, no heatmap. p99 is nearest-rank "
             "(= the max when n < 100). DINOv2 runs random-init weights (speed does not depend on them).", ""]
    rows = []
    for c in sec["configs"]:
        if "error" in c:
            rows.append([f"{c['backbone']} @ {c['side']}", f"FAILED: {c['error'][:80]}"] + [""] * (len(DOORS)))
            continue
        d = c["doors"]
        n = min(v["n"] for v in d.values())
        rows.append([f"{c['backbone']} @ {c['side']}" + (" *" if c.get("random_init_weights") else "")]
                    + [f"{d[k]['p50']:.1f} / {d[k]['p99']:.1f}" if k in d else "n/a" for k in DOORS] + [n])
    lines += _table(["backbone @ input", *DOORS, "n"], rows)
    lines += ["", "In-process stages (p50 ms, from `InferResult.timings_ms`):", ""]
    stage_rows, names = [], []
    for c in sec["configs"]:
        if "error" not in c:
            names = list(dict.fromkeys(names + list(c["in_process_stages_ms_p50"])))
    for c in sec["configs"]:
        if "error" not in c:
            st = c["in_process_stages_ms_p50"]
            stage_rows.append([f"{c['backbone']} @ {c['side']}"] + [st.get(k) for k in names]
                              + [f"{c['coreset_size']}/{c['n_embeddings']}"])
    lines += _table(["backbone @ input", *names, "bank/patches"], stage_rows)
    multi = [c for c in sec["configs"] if "error" not in c and c.get("multi_roi")]
    if multi:
        r = multi[0]["multi_roi"]["rois"]
        lines += ["", f"A part with {r} ROIs (one model each, PNG in, PNG heatmaps): one `infer_batch` call vs "
                  f"{r} `infer` calls, ms per part p50 / p99 (per ROI p50 in brackets):", ""]
        modes = list(multi[0]["multi_roi"]["per_part_ms"])
        rows = []
        for c in multi:
            mr = c["multi_roi"]
            rows.append([f"{c['backbone']} @ {c['side']}"]
                        + [f"{mr['per_part_ms'][k]['p50']:.1f} / {mr['per_part_ms'][k]['p99']:.1f} "
                           f"({mr['per_roi_p50_ms'][k]:.1f})" if k in mr["per_part_ms"] else "n/a" for k in modes]
                        + [_f(mr.get("batch_speedup_in-process"), ".2f"), _f(mr.get("batch_speedup_ZeroMQ"), ".2f")])
        lines += _table(["backbone @ input", *modes, "batch gain in-proc", "batch gain ZeroMQ"], rows)
    notes = sorted({n for c in sec["configs"] for n in c.get("notes", [])})
    lines += [""] + [f"- note: {n}" for n in notes] + [""]
    return lines


def _fit_md(sec: dict[str, Any]) -> list[str]:
    lines = [f"## Fit time vs number of images ({sec['backbone']} @ {sec['side']}, coreset "
             f"{sec['coreset_ratio']:g}; seconds)", "",
             "Bottle train images, augmented (flips / rotations / crops) beyond the 209 originals, passed as "
             "RGB arrays (~380-448 px), so `decode` is checks + resize, not PNG decoding. One process per "
             "row; peak extra RSS = sampled peak above the RSS before the fit.", ""]
    stages: list[str] = []
    for r in sec["rows"]:
        if "error" not in r:
            stages = list(dict.fromkeys(stages + list(r["timings_ms"])))
    rows = []
    for r in sec["rows"]:
        if "error" in r:
            rows.append([r["n_images"], f"FAILED: {r['error'][:80]}"])
            continue
        rows.append([r["n_images"]] + [round(r["timings_ms"].get(k, 0) / 1000, 2) for k in stages]
                    + [r["wall_s"], r["n_embeddings"], r["coreset_size"], r["fit_peak_extra_rss_mib"]])
    lines += _table(["images", *stages, "wall", "patches", "coreset", "peak extra RSS MiB"], rows)
    return lines + [""]


def _coreset_md(sec: dict[str, Any]) -> list[str]:
    st = sec.get("settings", {})
    lines = [f"## Coreset time and memory vs bank size (keep {sec['ratio']:.0%}; selection on "
             f"{st.get('projection_dim')} principal axes)", "",
             "Synthetic clustered float32 features. Peak extra RSS = sampled peak above the RSS with the bank "
             "already in memory; process peak = ru_maxrss of the child (bank included).", ""]
    rows = []
    for r in sec["rows"]:
        if "error" in r:
            rows.append([r["n"], r["d"], f"FAILED: {r['error'][:80]}"])
            continue
        rows.append([r["n"], r["d"], r["k"], r["seconds"], r["us_per_kept_row"], r["bank_mib"],
                     r["peak_extra_rss_mib"], r["process_peak_rss_mib"]])
    lines += _table(["rows", "dims", "kept", "seconds", "us / kept row", "bank MiB", "peak extra MiB",
                     "process peak MiB"], rows)
    t = sec.get("target", {})
    if t and "error" not in t:
        sub = t["subset"]
        lines += ["", f"Against exact greedy, synthetic: {t['n']} x {t['d']} at {t['ratio']:.0%}: "
                  f"engine {t['approx_s']:.2f} s (runs {t['approx_runs_s']}); "
                  f"exact numpy {t['exact_ms_per_pick']:.1f} ms/pick, "
                  f"~{t['exact_full_estimated_s']:.0f} s estimated for all {t['k']} picks. On a {sub['rows']}-row "
                  f"subset (k={sub['k']}), both run in full: engine {sub['approx_s']:.2f} s, "
                  f"exact {sub['exact_s']:.1f} s "
                  f"({sub['speedup']:.1f}x); covering radius {sub['radius_approx']:.4f} vs {sub['radius_exact']:.4f} "
                  f"({sub['radius_ratio']:.3f}x)."]
        for label, real in (("On real 384-dim features", t.get("real_384")),
                            ("Same comparison on the engine's default features", t.get("real_subset"))):
            if real and "radius_ratio" in real:
                lines += ["", f"{label} ({real['source']}, {real['rows']} x {real['d']}, k={real['k']}), both run "
                          f"in full: engine {real['approx_s']:.2f} s (runs {real.get('approx_runs_s')}), exact "
                          f"{real['exact_s']:.1f} s ({real['speedup']:.1f}x); covering radius "
                          f"{real['radius_approx']:.4f} vs {real['radius_exact']:.4f} ({real['radius_ratio']:.3f}x)."]
    elif t:
        lines += ["", f"Target comparison FAILED: {t['error']}"]
    return lines + [""]


def _memory_md(sec: dict[str, Any]) -> list[str]:
    fit = sec.get("fit", {})
    lines = [f"## Resident memory with N ROI models loaded ({sec['backbone']} @ {sec['side']}, "
             f"{sec['images_per_model']} images per model)", "",
             f"Models: mean coreset {fit.get('coreset_size_mean')} rows x {fit.get('feature_dim')} dims; "
             f"{fit.get('disk_mib_total')} MiB on disk for {fit.get('models')}. Baseline = {sec.get('baseline_note')}: "
             f"{sec.get('baseline_rss_mib')} MiB (process before the engine: "
             f"{sec.get('rss_before_engine_mib')} MiB).", ""]
    lines += _table(["models loaded", "RSS MiB", "above baseline MiB", "per model MiB", "in cache"],
                    [[r["models"], r["rss_mib"], r["above_baseline_mib"], r["per_model_mib"], r["cached"]]
                     for r in sec["rows"]])
    return lines + [""]


def _quality_md(sec: dict[str, Any]) -> list[str]:
    method = next((r.get("method") for r in sec["rows"] if "error" not in r), "?")
    lines = [f"## Quality vs speed ({sec['dataset']}, {sec['backbone']}, fit on {sec['max_train']} of 209 train "
             "images, all 83 test images scored)", "", f"AUROC by {method}; pixel AUROC on 256 x 256 maps/masks.", ""]
    rows = []
    for r in sec["rows"]:
        if "error" in r:
            rows.append([r["side"], r["ratio"], f"FAILED: {r['error'][:80]}"])
            continue
        st = r.get("infer_stages_ms_p50") or {}
        rows.append([r["side"], r["ratio"], f"{r['image_auroc']:.4f}", _f(r["pixel_auroc"], ".4f"),
                     f"{r['coreset_size']}/{r['n_embeddings']}", r["fit_s"], _f(r["infer_ms_p50"]),
                     _f(st.get("extract")), _f(st.get("knn"), ".2f")])
    lines += _table(["input", "coreset ratio", "image AUROC", "pixel AUROC", "bank/patches", "fit s",
                     "infer ms p50", "of which extract", "of which kNN"], rows)
    return lines + [""]


# --- plots -------------------------------------------------------------------------------------

def plots(report: dict[str, Any], out: Path) -> tuple[list[str], list[str]]:
    """Write the PNG plots; (file names written, problems). Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], [f"no plots: matplotlib missing ({exc}); pip install -e '.[bench]'"]
    written, problems = [], []
    s = report["sections"]
    for name, fn in (("latency.png", _plot_latency), ("multi_roi.png", _plot_multi), ("fit.png", _plot_fit),
                     ("coreset.png", _plot_coreset), ("memory.png", _plot_memory), ("quality.png", _plot_quality)):
        try:
            fig = fn(plt, s)
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the report
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written, problems


def _ok(sec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not sec or "error" in sec:
        return []
    return [r for r in sec.get(key, []) if "error" not in r]


def _plot_latency(plt: Any, s: dict[str, Any]) -> Any:
    configs = _ok(s.get("latency"), "configs")
    if not configs:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(DOORS)
    x = np.arange(len(configs))
    for i, door in enumerate(DOORS):
        p50 = [c["doors"].get(door, {}).get("p50", np.nan) for c in configs]
        p99 = [c["doors"].get(door, {}).get("p99", np.nan) for c in configs]
        err = np.clip(np.array(p99) - np.array(p50), 0, None)
        ax.bar(x + (i - len(DOORS) / 2 + 0.5) * width, p50, width, yerr=[np.zeros_like(err), err], capsize=2,
               label=door)
    ax.set_xticks(x, [f"{c['backbone'].replace('efficientnet_', '')}\n@{c['side']}" for c in configs])
    ax.set_yscale("log")
    ax.set_ylabel("ms per ROI (bar p50, whisker p99)")
    ax.set_title("Infer latency per ROI by path (DINOv2: random-init weights)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def _plot_multi(plt: Any, s: dict[str, Any]) -> Any:
    configs = [c for c in _ok(s.get("latency"), "configs") if c.get("multi_roi")]
    if not configs:
        return None
    import numpy as np

    modes = list(configs[0]["multi_roi"]["per_part_ms"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(modes)
    x = np.arange(len(configs))
    for i, mode in enumerate(modes):
        ax.bar(x + (i - len(modes) / 2 + 0.5) * width,
               [c["multi_roi"]["per_part_ms"].get(mode, {}).get("p50", np.nan) for c in configs], width, label=mode)
    ax.set_xticks(x, [f"{c['backbone'].replace('efficientnet_', '')}\n@{c['side']}" for c in configs])
    ax.set_yscale("log")
    ax.set_ylabel("ms per part (p50)")
    ax.set_title(f"A part with {configs[0]['multi_roi']['rois']} ROIs: infer_batch vs single infers")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def _plot_fit(plt: Any, s: dict[str, Any]) -> Any:
    rows = _ok(s.get("fit"), "rows")
    if not rows:
        return None
    stages = list(dict.fromkeys(k for r in rows for k in r["timings_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [str(r["n_images"]) for r in rows]
    bottom = [0.0] * len(rows)
    for stage in stages:
        vals = [r["timings_ms"].get(stage, 0) / 1000 for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("training images")
    ax.set_ylabel("seconds")
    ax.set_title(f"fit_ok by stage ({s['fit']['backbone']} @ {s['fit']['side']})")
    ax.legend(fontsize=8)
    return fig


def _plot_coreset(plt: Any, s: dict[str, Any]) -> Any:
    rows = _ok(s.get("coreset"), "rows")
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, d in enumerate(sorted({r["d"] for r in rows})):
        color = f"C{i}"
        rs = sorted((r for r in rows if r["d"] == d), key=lambda r: r["n"])
        a.plot([r["n"] for r in rs], [r["seconds"] for r in rs], "o-", color=color, label=f"{d} dims")
        b.plot([r["n"] for r in rs], [r["peak_extra_rss_mib"] for r in rs], "o-", color=color,
               label=f"{d} dims: added by the selection")
        b.plot([r["n"] for r in rs], [r["bank_mib"] for r in rs], "x--", color=color, alpha=0.5,
               label=f"{d} dims: the bank itself")
    t = s["coreset"].get("target") or {}
    if "approx_s" in t:
        a.plot([t["n"]], [t["approx_s"]], "r*", ms=12, label=f"target run {t['n']} x {t['d']} synthetic")
    real = t.get("real_384") or {}
    if "approx_s" in real:
        a.plot([real["rows"]], [real["approx_s"]], "k*", ms=12, label=f"target run {real['rows']} x {real['d']} real")
    a.axhline(10, color="red", lw=0.8, ls=":", label="target 10 s (200k x 384)")
    for ax, title, ylabel in ((a, "greedy_coreset time (keep 10 %)", "seconds"),
                              (b, "peak RSS during the selection", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bank rows (patches)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def _plot_memory(plt: Any, s: dict[str, Any]) -> Any:
    rows = _ok(s.get("memory"), "rows")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["models"] for r in rows], [r["rss_mib"] for r in rows], "o-")
    ax.axhline(s["memory"]["baseline_rss_mib"], color="grey", ls=":", label="engine, no model loaded")
    ax.set_xscale("log")
    ax.set_xlabel("ROI models loaded")
    ax.set_ylabel("process RSS (MiB)")
    ax.set_title(f"Resident memory ({s['memory']['images_per_model']} images per model)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _plot_quality(plt: Any, s: dict[str, Any]) -> Any:
    rows = _ok(s.get("quality"), "rows")
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in ((a, "fit_s", "fit seconds"), (b, "infer_ms_p50", "infer ms per image (p50)")):
        for metric, marker in (("image_auroc", "o"), ("pixel_auroc", "s")):
            pts = [(r[key], r[metric], f"{r['side']}/{r['ratio']:g}") for r in rows if r.get(metric) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=metric)
            for x, y, text in pts:
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AUROC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_title("bottle AUROC vs fit time (labels: input/coreset ratio)")
    b.set_title("bottle AUROC vs infer latency")
    return fig
