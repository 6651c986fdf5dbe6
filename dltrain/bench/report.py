"""From results.jsonl to summary.json: repeats aggregated, baseline ratios, scaling, the step model's
check against measured runs, the communication fits, and GPU projections (dltrain.bench.scaling).
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from dltrain.bench.figures import figure_mean

FIGURES = ["samples_per_s", "tokens_per_s", "padded_tokens_per_s", "step_time_ms_p50", "step_time_ms_p90",
           "data_wait_share", "achieved_flops_per_s", "mfu", "time_to_target_s", "peak_memory_mb", "wall_s",
           # outside the steady clock (runs from before that clock lack them)
           "eval_s", "checkpoint_s", "train_wall_s", "overall_samples_per_s", "clock_agreement"]
HIGHER_IS_BETTER = {"samples_per_s", "tokens_per_s", "padded_tokens_per_s", "achieved_flops_per_s", "mfu",
                    "overall_samples_per_s", "val/accuracy", "test/accuracy", "train/accuracy"}


def read_results(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _figures(rec: dict) -> dict[str, float]:
    out = {k: rec[k] for k in FIGURES if isinstance(rec.get(k), (int, float))}
    mem = rec.get("memory") or {}
    peak = mem.get("cuda_max_allocated_bytes", mem.get("cpu_peak_rss_bytes"))
    if peak:
        out["peak_memory_mb"] = peak / 2**20
    for k, v in (rec.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and k.split("/")[-1] in ("accuracy", "loss", "mse", "mse_ratio"):
            out[k] = v
    return out


DESCRIPTORS = ["kind", "entry", "workload", "mode", "pair", "reference", "world_size", "nnodes", "precision", "deepspeed_stage", "compile",
               "shape"]  # shape: what one step computes (dltrain.bench.measure.compute_shape)


def aggregate(records: list[dict]) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    for rec in records:
        cfg = configs.setdefault(rec["config"], {k: rec.get(k) for k in DESCRIPTORS} | {"runs": 0, "failed": 0, "errors": [], "_values": {}})
        cfg["runs"] += 1
        cfg["workload"] = cfg["workload"] or rec.get("workload")
        if rec["status"] != "ok":
            cfg["failed"] += 1
            cfg["errors"].append(rec.get("error"))
            continue
        for k, v in _figures(rec).items():
            cfg["_values"].setdefault(k, []).append(v)
        if rec.get("step_time_ms_percentiles"):
            cfg.setdefault("_percentiles", []).append(rec["step_time_ms_percentiles"])
        if rec.get("target"):
            cfg["target"] = rec["target"]
        if rec.get("mode") == "time_to_target":
            cfg["reached"] = cfg.get("reached", 0) + (rec.get("time_to_target_s") is not None)
        if rec.get("flops_basis"):  # what the FLOP/s and MFU count: samples, or text's padded tokens
            cfg["flops_basis"] = rec["flops_basis"]
        if rec.get("peak_source"):
            cfg["peak_source"], cfg["peak_flops_per_s"] = rec["peak_source"], rec.get("peak_flops_per_s")
    for cfg in configs.values():
        cfg["figures"] = {k: stats(v) for k, v in cfg.pop("_values").items()}
        runs = cfg.pop("_percentiles", None)
        if runs:  # p1..p99 of the step time, averaged over the repeats percentile by percentile
            cfg["step_time_ms_percentiles"] = [statistics.fmean(p) for p in zip(*runs)]
    return configs


def variants(records: list[dict], configs: dict[str, dict]) -> list[dict]:
    """Each config of an entry with a `reference` against the reference entry's config of the same
    world size, precision and mode: samples/s over the reference's, per repeat, then averaged."""
    ok = {(r["config"], r["repeat"]): r for r in records if r["status"] == "ok" and r.get("samples_per_s")}
    axes = ("world_size", "nnodes", "precision", "mode", "kind")
    rows = []
    for name, cfg in configs.items():
        ref = next((n for n, c in configs.items() if cfg.get("reference") and c["entry"] == cfg["reference"]
                    and all(c[a] == cfg[a] for a in axes)), None)
        if ref is None:
            continue
        ratios = [rec["samples_per_s"] / ok[(ref, rep)]["samples_per_s"] for (c, rep), rec in ok.items()
                  if c == name and (ref, rep) in ok]
        rows.append({"config": name, "reference_config": ref, "samples_per_s": figure_mean(cfg, "samples_per_s"),
                     "reference_samples_per_s": figure_mean(configs[ref], "samples_per_s"),
                     "ratio": stats(ratios) if ratios else None})
    return rows


def baseline_ratios(records: list[dict], configs: dict[str, dict]) -> list[dict]:
    """dltrain samples/s over each baseline's, per repeat (the two ran back to back), then averaged.
    Also the ratio of median step times (baseline p50 / dltrain p50): the same comparison, but
    deaf to bursts of a shared machine that a mean over a short window catches on one side only."""
    by_key = {(r["config"], r["repeat"]): r for r in records if r["status"] == "ok"}
    rows = []
    for name, cfg in configs.items():
        if cfg["kind"] == "dltrain" or not cfg.get("pair"):
            continue
        ratios, p50_ratios = [], []
        for (config, repeat), rec in by_key.items():
            ours = by_key.get((cfg["pair"], repeat))
            if config == name and ours and rec.get("samples_per_s") and ours.get("samples_per_s"):
                ratios.append(ours["samples_per_s"] / rec["samples_per_s"])
                if rec.get("step_time_ms_p50") and ours.get("step_time_ms_p50"):
                    p50_ratios.append(rec["step_time_ms_p50"] / ours["step_time_ms_p50"])
        rows.append({"config": name, "baseline": cfg["kind"], "entry": cfg["entry"], "precision": cfg["precision"],
                     "dltrain_config": cfg["pair"], "dltrain_samples_per_s": figure_mean(configs.get(cfg["pair"]), "samples_per_s"),
                     "baseline_samples_per_s": figure_mean(cfg, "samples_per_s"),
                     "ratio": stats(ratios) if ratios else None,
                     "ratio_p50_step": stats(p50_ratios) if p50_ratios else None,
                     "target": 0.95 if cfg["kind"] == "bare" else None})
    return rows


def rescale_cpu_mfu(records: list[dict], peaks: dict[str, float]) -> None:
    """CPU MFU against the best peak sampled over the whole suite (results.jsonl holds the value
    against the best peak known when the run ended)."""
    for rec in records:
        if rec.get("peak_procs") and rec.get("achieved_flops_per_s") and rec["precision"] in peaks:
            rec["peak_flops_per_s"] = peaks[rec["precision"]] * rec["peak_procs"]
            rec["mfu"] = rec["achieved_flops_per_s"] / rec["peak_flops_per_s"]


def read_comm(out_dir: Path) -> list[dict]:
    """What `dltrain bench comm` (or a suite's comm section) wrote under out_dir: one entry per world size."""
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("comm/*/comm.json"))] + \
        ([json.loads((out_dir / "comm.json").read_text())] if (out_dir / "comm.json").is_file() else [])


def build_summary(out_dir: Path, gpu_results: str | Path | None = None) -> dict:
    from dltrain.bench.comm import Fit
    from dltrain.bench.scaling import compute_refusals, projection, read_gpu_configs, refused_projections, scaling, validation

    records = read_results(out_dir)
    meta_path = out_dir / "bench_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rescale_cpu_mfu(records, meta.get("cpu_peak_flops_per_s", {}))
    configs = aggregate(records)
    comm = read_comm(out_dir)
    fits = [Fit(**f) for c in comm for f in c["fits"]]
    gpu_results = gpu_results or meta.get("gpu_results")
    env = next((r["environment"] for r in records if r.get("environment")), {})
    # A GPU suite's own world-1 runs are GPU compute; a CPU suite's never are.
    gpu_configs = read_gpu_configs(gpu_results) if gpu_results else (configs if env.get("device") == "cuda" else None)
    summary = {
        "suite": (meta.get("suite") or {}).get("name") or (records[0]["suite"] if records else None),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "repeats": meta.get("repeats"),
        "environment": env,
        "cpu_peak_flops_per_s": meta.get("cpu_peak_flops_per_s", {}),
        "cpu_threads": (meta.get("suite") or {}).get("cpu_threads"),
        "flops": meta.get("flops", {}),
        "configs": configs,
        "baselines": baseline_ratios(records, configs),
        "variants": variants(records, configs),
        "scaling": scaling(configs),
        "comm": comm,
        "validation": (checks := validation(configs, meta.get("flops", {}), fits)),
        "projection_refused": (refused := refused_projections(checks) | compute_refusals(meta.get("flops", {}), gpu_configs)),
        "projection": projection(meta.get("flops", {}), gpu_configs, refused),
        "gpu_results": str(gpu_results) if gpu_results else None,
        "runs": len(records),
        "failed": sum(r["status"] != "ok" for r in records),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
