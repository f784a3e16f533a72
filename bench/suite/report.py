"""The suite's outputs: targets with pass/fail, the markdown summary and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PASS, FAIL = "PASS", "FAIL"


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

    rows += _latency_targets(sections)
    rows += _fit_quality_targets(sections)

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


def _production(sections: dict[str, Any]) -> list[dict[str, Any]]:
    lat = sections.get("latency") or {}
    return [c for c in lat.get("production", []) if "error" not in c]


def _latency_targets(sections: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    ratio_name = "bottle 209-image model, 900x900 PNG ROI via ZeroMQ: p50 <= 1.5x (decode+resize + forward) p50"
    knn_name = "memory >= 60k rows: kNN stage <= 15 % of the ROI p50 (ZeroMQ, PNG)"
    exact_name = "refined search = exact search on test ROIs (decisions, regions; scores within 1e-4 rel.)"
    why = _missing("latency", sections)
    configs = [] if why else _production(sections)
    if why or not configs:
        return [_target(n, "-", why or "not measured: no production model") for n in (ratio_name, knn_name)]
    for c in configs:
        if c["images"] != 209 and c is not configs[0]:
            continue
        label = f"{c['images']} images @ {c['side']} ({c['coreset_size']} rows)"
        for probe, p in c["probes"].items():
            raw = f"raw RGB in, no heatmap: {p['zmq_raw_ratio']:.2f}x"
            rows.append(_target(f"{ratio_name}: {label}, {probe} ROI",
                                f"{p['zmq_ratio']:.2f}x ({c['doors'][f'ZeroMQ {probe}']['p50']:.1f} / "
                                f"{p['decode_resize_forward_p50']:.1f} ms)",
                                PASS if p["zmq_ratio"] <= 1.5 and c["images"] >= 209 else FAIL, raw))
    large = [c for c in configs if c["coreset_size"] >= 60_000]
    if not large:
        rows.append(_target(knn_name, "-", "not measured: no memory of >= 60k rows in this run"))
    for c in large:
        for probe, p in c["probes"].items():
            rows.append(_target(f"{knn_name}: {c['coreset_size']} rows @ {c['side']}, {probe} ROI",
                                f"{100 * p['knn_share_of_zmq']:.1f} % ({p['stages_ms_p50'].get('knn', 0):.1f} ms of "
                                f"{c['doors'][f'ZeroMQ {probe}']['p50']:.1f})",
                                PASS if p["knn_share_of_zmq"] <= 0.15 else FAIL))
    for c in configs:
        r = c.get("refinement") or {}
        checked = r.get("exact_checked_images", len(r.get("exact_checks") or []))
        if checked:
            ok = r["exact_same_decisions"] and r["exact_same_regions"] and r["exact_max_score_rel_diff"] <= 1e-4
            rows.append(_target(f"{exact_name}: {c['coreset_size']} rows @ {c['side']}",
                                f"{checked} ROIs: decisions "
                                f"{'equal' if r['exact_same_decisions'] else 'DIFFER'}, "
                                f"regions {'equal' if r['exact_same_regions'] else 'DIFFER'}, max score diff "
                                f"{r['exact_max_score_rel_diff']:.1e}", PASS if ok else FAIL))
        a = r.get("auroc")
        if a:
            ok = max(abs(a["image_refined"] - a["image_exact"]), abs(a["pixel_refined"] - a["pixel_exact"])) <= 1e-3
            rows.append(_target(f"bottle AUROC, refined within 0.001 of exact: {c['coreset_size']} rows @ {c['side']}",
                                f"image {a['image_refined']:.6f} / {a['image_exact']:.6f}, pixel "
                                f"{a['pixel_refined']:.6f} / {a['pixel_exact']:.6f}", PASS if ok else FAIL))
    return rows


def _fit_quality_targets(sections: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    name = "fit of 762 images (~600k patches at 224) <= 45 s"
    why = _missing("fit", sections)
    big = [] if why else [r for r in sections["fit"]["rows"] if r.get("n_images") == 762 and "error" not in r]
    if big:
        r = big[0]
        stages = ", ".join(f"{k} {v / 1000:.1f}" for k, v in r["timings_ms"].items())
        rows.append(_target(name, f"{r['wall_s']:.1f} s ({r['n_embeddings']} patches)",
                            PASS if r["wall_s"] <= 45 else FAIL, f"stages s: {stages}"))
    else:
        rows.append(_target(name, "-", why or "not measured: no 762-image row"))
    name = "quality unchanged: image and pixel AUROC within 0.001 of exact search, decisions equal, scores within 1e-4"
    why = _missing("quality", sections)
    e = None if why else sections["quality"].get("exact_check")
    if not e or "error" in e:
        rows.append(_target(name, "-", why or f"not measured: {(e or {}).get('error', 'no exact check')}"))
    else:
        ok = (e["image_auroc_diff"] <= 0.001 and e["pixel_auroc_diff"] <= 0.001 and e["max_score_rel_diff"] <= 1e-4
              and e["decisions_equal"] == e["decisions_total"])
        rows.append(_target(name, f"image AUROC {e['image_auroc']['refined']:.4f} vs {e['image_auroc']['exact']:.4f}, "
                                  f"pixel {e['pixel_auroc']['refined']:.4f} vs {e['pixel_auroc']['exact']:.4f}; "
                                  f"max score diff {e['max_score_rel_diff']:.1e}; decisions "
                                  f"{e['decisions_equal']}/{e['decisions_total']} equal, region pixels "
                                  f"{e.get('region_pixels_equal_beyond_rounding')}/{e['decisions_total']} equal "
                                  f"(boxes and areas {e['regions_equal']}/{e['decisions_total']})",
                            PASS if ok else FAIL, f"{e['n_train']} train images, memory {e['coreset_size']} rows"))
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
        f"- torch {m['torch']} ({m['torch_threads']} threads), faiss {m['faiss']} (search scans: "
        f"{m.get('search_scans', m.get('exact_scan', 'numpy'))}), numpy {m['numpy']}, "
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
    if "latency" in s and "production" in s["latency"]:
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
    lines = ["## ROI latency on production-sized models (ms)", "",
             "EfficientNet-Lite0 fitted on the bottle train images (900 x 900 PNG files), calibrated. ROIs: "
             "900 x 900 PNG files (a defective and a good bottle test image). All paths called in turn in one "
             "run: `decode+resize` and `forward` alone, `in-process` and `ZeroMQ` (PNG in, PNG heatmap out), "
             "`ZeroMQ raw` (RGB array in, no heatmap). Ratio = ZeroMQ p50 / (decode+resize p50 + forward p50). "
             "Stages: medians of the in-process `timings_ms`; door = ZeroMQ p50 - in-process p50.", ""]
    rows, stage_rows = [], []
    for c in sec.get("production", []):
        label = f"{c.get('images')} images @ {c.get('side')}"
        if "error" in c:
            rows.append([label, f"FAILED: {c['error'][:100]}"])
            continue
        for probe, p in c["probes"].items():
            d = c["doors"]
            rows.append([label, f"{c['coreset_size']} ({c['index']['kind']})", probe,
                         d[f"decode+resize {probe}"]["p50"], d[f"forward {probe}"]["p50"],
                         d[f"in-process {probe}"]["p50"], d[f"ZeroMQ {probe}"]["p50"], d[f"ZeroMQ {probe}"]["p99"],
                         d[f"ZeroMQ raw {probe}"]["p50"], f"{p['zmq_ratio']:.2f}x", f"{p['zmq_raw_ratio']:.2f}x",
                         d[f"ZeroMQ {probe}"]["n"]])
            st = p["stages_ms_p50"]
            stage_rows.append([label, probe] + [st.get(k) for k in ("preprocess", "extract", "knn", "map", "regions",
                                                                      "heatmap", "total")]
                              + [p["door_ms"], f"{100 * p['knn_share_of_zmq']:.1f} %", p["decision"]])
    lines += _table(["model", "memory rows", "ROI", "decode+resize", "forward", "in-process", "ZeroMQ p50",
                     "ZeroMQ p99", "ZeroMQ raw", "ratio", "raw ratio", "n"], rows)
    lines += ["", "Stages (p50 ms; `preprocess` = decode + mask + resize, `knn` = approximate search and exact "
              "re-scoring, `map` = maps, percentile and level checks; `regions` and `heatmap` run side by side, each "
              "timed on its own):", ""]
    lines += _table(["model", "ROI", "preprocess", "extract", "knn", "map", "regions", "heatmap", "total", "door",
                     "kNN share", "decision"], stage_rows)
    lines += ["", "Exact refinement over the bottle test set (patches re-scored exactly per ROI; flat-search "
              "check on every test ROI of memories up to 20k rows, on a few above):", ""]
    refine_rows = []
    for c in sec.get("production", []):
        r = c.get("refinement") or {}
        if "error" in c or not r:
            continue
        refine_rows.append([f"{c['images']} images @ {c['side']}", r["images"], r["patches_per_image"],
                            r["refined_mean"], r["refined_mean_good"], r["refined_mean_defective"], r["refined_max"],
                            r["more_than_one_round"], r["knn_ms_p50"],
                            r.get("exact_checked_images", len(r["exact_checks"])),
                            _f(r["exact_max_score_rel_diff"], ".1e"),
                            "yes" if r["exact_same_decisions"] and r["exact_same_regions"] else "NO"])
    lines += _table(["model", "ROIs", "patches", "refined mean", "good", "defective", "max", "2+ rounds",
                     "kNN ms p50", "flat checks", "max score diff", "same decisions/regions"], refine_rows)
    lines += _threads_md(sec) + _crossover_md(sec) + _small_md(sec)
    return lines + [""]


def _threads_md(sec: dict[str, Any]) -> list[str]:
    runs = [t for t in sec.get("threads", []) if "error" not in t]
    if not runs:
        return []
    model = f"{runs[0]['side']} px model" if "side" in runs[0] else "first production model"
    lines = ["", "Thread counts (`BACKEND_TORCH_THREADS`; default = one per core; BLAS always one): ROIs per "
             f"second through the ZeroMQ door (PNG in/out, {model}) with concurrent clients, and per-request "
             "p50 ms:", ""]
    clients = [r["clients"] for r in runs[0]["rows"]]
    rows = [[t["torch_threads"]] + [f"{r['rois_per_s']:.1f} ({r['latency_ms']['p50']:.0f})" for r in t["rows"]]
            + [_paced_cell(t.get("paced"))] for t in runs]
    gap = next((t["paced"]["gap_s"] for t in runs if t.get("paced")), None)
    paced = f"1 client, {gap} s idle before each: p50 (p90) ms" if gap is not None else "paced"
    return lines + _table(["threads", *[f"{c} clients" for c in clients], paced], rows)


def _paced_cell(paced: dict[str, Any] | None) -> str:
    if not paced:
        return "-"
    return f"{paced['latency_ms']['p50']:.0f} ({paced['latency_ms']['p90']:.0f})"


def _crossover_md(sec: dict[str, Any]) -> list[str]:
    c = sec.get("crossover") or {}
    if not c.get("rows"):
        return []
    keys = [k for k in c["rows"][0] if " " in k]
    lines = ["", f"kNN stage (ms p50) of flat against refined search by memory size ({c.get('source')}):", ""]
    return lines + _table(["memory rows", "lists", "nprobe", *keys],
                          [[r["rows"], r["nlist"], r["nprobe"]] + [r[k] for k in keys] for r in c["rows"]])


def _small_md(sec: dict[str, Any]) -> list[str]:
    rows = []
    for c in sec.get("small", []):
        if "error" in c:
            rows.append([f"{c['backbone']} @ {c['side']}", f"FAILED: {c['error'][:80]}"])
            continue
        d = c["doors"]
        rows.append([f"{c['backbone']} @ {c['side']}" + (" (random init)" if c.get("random_init_weights") else ""),
                     c["coreset_size"]] + [f"{d[k]['p50']:.1f} / {d[k]['p99']:.1f}" for k in ("forward", "in-process",
                                                                                          "ZeroMQ")])
    if not rows:
        return []
    return ["", "10-image models (memory of a few hundred rows; the ROI at the input side; p50 / p99 ms):", ""] + \
        _table(["backbone @ input", "memory rows", "forward", "in-process", "ZeroMQ"], rows)


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
    e = sec.get("exact_check") or {}
    if e and "error" not in e:
        lines += ["", f"Refined against exact (flat) search, same fit ({e['n_train']} train images, memory "
                  f"{e['coreset_size']} rows, all {e['n_test']} test images, `engine.evaluate` defaults):", ""]
        lines += _table(["search", "image AUROC", "pixel AUROC", "kNN ms p50", "infer ms p50"],
                        [[k, e["image_auroc"][k], e["pixel_auroc"][k], e["infer_ms"][k].get("knn"),
                          e["infer_ms"][k].get("total")] for k in ("refined", "exact")])
        lines += ["", f"Largest relative image-score difference {e['max_score_rel_diff']:.2e}; with one threshold "
                  f"({e['threshold']:.4f}) on both models: decisions equal on {e['decisions_equal']}/"
                  f"{e['decisions_total']} test images ({e['ng_by_exact']} NG); the pixels at or above the "
                  f"threshold equal on {e.get('region_pixels_equal_beyond_rounding')} (apart from pixels within "
                  f"1e-5 of the threshold, where the flat search's float32 rounding alone decides); region boxes "
                  f"and areas equal on {e['regions_equal']}."]
    elif e:
        lines += ["", f"Exact check FAILED: {e['error']}"]
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
    for name, fn in (("latency.png", _plot_latency), ("threads.png", _plot_multi), ("fit.png", _plot_fit),
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
    configs = [c for c in (s.get("latency") or {}).get("production", []) if "error" not in c]
    if not configs:
        return None
    import numpy as np

    stages = ("preprocess", "extract", "knn", "map", "regions", "heatmap")
    labels, bars = [], {k: [] for k in (*stages, "door")}
    for c in configs:
        for probe, p in c["probes"].items():
            labels.append(f"{c['side']} px\n{probe}")
            for k in stages:
                bars[k].append(p["stages_ms_p50"].get(k, 0.0))
            bars["door"].append(max(0.0, p["door_ms"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = np.zeros(len(labels))
    for k, values in bars.items():
        ax.bar(labels, values, bottom=bottom, label=k)
        bottom += np.array(values)
    ax.set_ylabel("ms per ROI (p50 stages, ZeroMQ door on top)")
    ax.set_title("900 x 900 PNG ROI through ZeroMQ, bottle 209-image models by input size")
    ax.legend(fontsize=8)
    return fig


def _plot_multi(plt: Any, s: dict[str, Any]) -> Any:
    runs = [t for t in (s.get("latency") or {}).get("threads", []) if "error" not in t]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in runs:
        ax.plot([r["clients"] for r in t["rows"]], [r["rois_per_s"] for r in t["rows"]], "o-",
                label=f"threads {t['torch_threads']}")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ROIs per second")
    side = runs[0].get("side")
    ax.set_title("Throughput through the ZeroMQ door" + (f" ({side} px model)" if side else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
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
