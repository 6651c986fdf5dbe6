"""From results.jsonl to summary.json: repeats aggregated, baseline ratios, scaling, projection.

Scaling efficiency at world size N is throughput(N) / (N x throughput(1)), measured at constant
per-device batch (the suite's scale_batch). The projection to 8..1024 GPUs is a model, not a
measurement: step time(N) = compute + ring all-reduce, with compute the measured step time at
world size 1 and the all-reduce of G gradient bytes over a ring of N devices taking
2 (N - 1) / N x G / bandwidth (each device sends and receives 2 (N-1)/N of the buffer; latency and
the overlap of communication with the backward pass are ignored, so it is the no-overlap bound).
Within a node (N <= 8) the link is NVLink; beyond, the ring is limited by the slowest hop, the
InfiniBand NIC of each GPU.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

FIGURES = ["samples_per_s", "tokens_per_s", "padded_tokens_per_s", "step_time_ms_p50", "step_time_ms_p90",
           "data_wait_share", "achieved_flops_per_s", "mfu", "time_to_target_s", "peak_memory_mb", "wall_s",
           # outside the steady clock (runs from before that clock lack them)
           "eval_s", "checkpoint_s", "train_wall_s", "overall_samples_per_s", "clock_agreement"]
HIGHER_IS_BETTER = {"samples_per_s", "tokens_per_s", "padded_tokens_per_s", "achieved_flops_per_s", "mfu",
                    "overall_samples_per_s", "val/accuracy", "test/accuracy", "train/accuracy"}
# Bandwidth per GPU and direction, bytes/s. NVLink 4 on H100 SXM is 900 GB/s bidirectional;
# NDR InfiniBand is 400 Gb/s per NIC, one NIC per GPU on current GPU nodes.
LINKS = {"NVLink 4 (450 GB/s per direction)": 450e9, "InfiniBand NDR (400 Gb/s = 50 GB/s per GPU)": 50e9}
PROJECTED_WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]
GPUS_PER_NODE = 8


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


DESCRIPTORS = ["kind", "entry", "workload", "mode", "pair", "world_size", "nnodes", "precision", "deepspeed_stage", "compile"]


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
        if rec.get("target"):
            cfg["target"] = rec["target"]
        if rec.get("mode") == "time_to_target":
            cfg["reached"] = cfg.get("reached", 0) + (rec.get("time_to_target_s") is not None)
        if rec.get("peak_source"):
            cfg["peak_source"], cfg["peak_flops_per_s"] = rec["peak_source"], rec.get("peak_flops_per_s")
    for cfg in configs.values():
        cfg["figures"] = {k: stats(v) for k, v in cfg.pop("_values").items()}
    return configs


def _mean(cfg: dict | None, key: str) -> float | None:
    fig = (cfg or {}).get("figures", {}).get(key)
    return fig["mean"] if fig else None


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
                     "dltrain_config": cfg["pair"], "dltrain_samples_per_s": _mean(configs.get(cfg["pair"]), "samples_per_s"),
                     "baseline_samples_per_s": _mean(cfg, "samples_per_s"),
                     "ratio": stats(ratios) if ratios else None,
                     "ratio_p50_step": stats(p50_ratios) if p50_ratios else None,
                     "target": 0.95 if cfg["kind"] == "bare" else None})
    return rows


def _group_key(cfg: dict) -> tuple:
    return (cfg["entry"], cfg["precision"], cfg["deepspeed_stage"], cfg["compile"])


def scaling(configs: dict[str, dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for name, cfg in configs.items():
        if cfg["kind"] == "dltrain" and cfg["mode"] == "throughput" and _mean(cfg, "samples_per_s"):
            groups.setdefault(_group_key(cfg), []).append(cfg | {"config": name})
    rows = []
    for key, cfgs in groups.items():
        base = next((c for c in cfgs if c["world_size"] == 1), None)
        if base is None or len(cfgs) < 2:
            continue
        t1 = _mean(base, "samples_per_s")
        for c in sorted(cfgs, key=lambda c: (c["world_size"], c["nnodes"])):
            speedup = _mean(c, "samples_per_s") / t1
            rows.append({"entry": key[0], "precision": key[1], "deepspeed_stage": key[2], "compile": key[3],
                         "config": c["config"], "world_size": c["world_size"], "nnodes": c["nnodes"],
                         "samples_per_s": _mean(c, "samples_per_s"), "speedup": speedup, "efficiency": speedup / c["world_size"]})
    return rows


def projection(configs: dict[str, dict], flops: dict[str, dict]) -> list[dict]:
    """Projected, not measured: see the module docstring for the model."""
    rows = []
    for name, cfg in configs.items():
        if not (cfg["kind"] == "dltrain" and cfg["mode"] == "throughput" and cfg["world_size"] == 1
                and cfg["deepspeed_stage"] is None and not cfg["compile"]):
            continue
        compute_s = (_mean(cfg, "step_time_ms_p50") or 0) / 1e3
        grad_bytes = (flops.get(cfg["entry"]) or {}).get("grad_bytes")
        if not compute_s or not grad_bytes:
            continue
        for n in PROJECTED_WORLDS:
            link, bw = list(LINKS.items())[0 if n <= GPUS_PER_NODE else 1]
            comm_s = 2 * (n - 1) / n * grad_bytes / bw
            rows.append({"config": name, "entry": cfg["entry"], "precision": cfg["precision"], "world_size": n,
                         "link": link, "compute_ms": compute_s * 1e3, "allreduce_ms": comm_s * 1e3,
                         "grad_mb": grad_bytes / 2**20, "efficiency": compute_s / (compute_s + comm_s),
                         "samples_per_s": n * _mean(cfg, "samples_per_s") * compute_s / (compute_s + comm_s),
                         "label": "projected"})
    return rows


def rescale_cpu_mfu(records: list[dict], peaks: dict[str, float]) -> None:
    """CPU MFU against the best peak sampled over the whole suite (results.jsonl holds the value
    against the best peak known when the run ended)."""
    for rec in records:
        if rec.get("peak_procs") and rec.get("achieved_flops_per_s") and rec["precision"] in peaks:
            rec["peak_flops_per_s"] = peaks[rec["precision"]] * rec["peak_procs"]
            rec["mfu"] = rec["achieved_flops_per_s"] / rec["peak_flops_per_s"]


def build_summary(out_dir: Path) -> dict:
    records = read_results(out_dir)
    meta_path = out_dir / "bench_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rescale_cpu_mfu(records, meta.get("cpu_peak_flops_per_s", {}))
    configs = aggregate(records)
    env = next((r["environment"] for r in records if r.get("environment")), {})
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
        "scaling": scaling(configs),
        "projection": projection(configs, meta.get("flops", {})),
        "runs": len(records),
        "failed": sum(r["status"] != "ok" for r in records),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
