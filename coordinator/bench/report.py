"""results.json and results.md: a table per bound (policy, plan knobs, predicted, measured,
ratio to static, bound met) and the headline ratios.

A policy that misses its bound keeps its measured throughput in the tables, but its ratio is
not counted as a win: the headline averages only bounds the policy met.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from coordinator.bench.measure import comparable
from coordinator.bench.sensitivity import well_conditioned, worst


def _by_bound(rows: list[dict[str, Any]]) -> dict[float | None, dict[str, dict[str, Any]]]:
    out: dict[float | None, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["bound_s"], {})[r["policy"]] = r
    return out


def _thr(row: dict[str, Any] | None) -> float | None:
    m = (row or {}).get("measured") or {}
    return m.get("throughput_seq_s")


def ratio(row: dict[str, Any] | None, base: dict[str, Any] | None) -> float | None:
    a, b = _thr(row), _thr(base)
    return a / b if a is not None and b else None


def headline(rows: list[dict[str, Any]], policy: str = "exegpt") -> dict[str, Any]:
    """exegpt / static per bound (mean over bounds exegpt met), exegpt / continuous at the two
    tightest bounds, and the planner's prediction errors over the measured rows whose plan the
    K requests can fill (the others never reach the steady state the planner predicts)."""
    table = _by_bound(rows)
    order = sorted(table, key=lambda b: math.inf if b is None else b)
    per_bound = []
    for b in order:
        mine = table[b].get(policy)
        met = bool(((mine or {}).get("measured") or {}).get("bound_met"))
        per_bound.append({"bound_s": b, "met": met,
                          "vs_static": ratio(mine, table[b].get("static")),
                          "vs_continuous": ratio(mine, table[b].get("continuous"))})
    wins_static = [p["vs_static"] for p in per_bound if p["met"] and p["vs_static"]]
    tight = [p["vs_continuous"] for p in per_bound[:2] if p["met"] and p["vs_continuous"]]
    runs = [r for r in rows if r.get("error") and not r.get("reused_from") and r.get("fills")]
    steady = [r for r in runs if well_conditioned(r.get("elasticity"))]
    return {"policy": policy, "per_bound": per_bound,
            "mean_vs_static_met": statistics.fmean(wins_static) if wins_static else None,
            "mean_vs_continuous_two_tightest_met": statistics.fmean(tight) if tight else None,
            "misses": [p["bound_s"] for p in per_bound if not p["met"]],
            "abs_error": _abs_errors(runs),
            # against the prediction scaled by each run's CPU stretch over the calibration's
            # (stretch.py): the model's error without the machine's load moving
            "abs_error_at_run_load": _abs_errors(runs, "error_at_run_load"),
            # the same over the plans whose prediction a 5% profile error moves <= ~10%
            "abs_error_well_conditioned": _abs_errors(steady),
            "ill_conditioned": [{"bound_s": r["bound_s"], "policy": r["policy"],
                                 "latency_elasticity": worst(r.get("elasticity"),
                                                             "latency_p99len_s")}
                                for r in runs if well_conditioned(r.get("elasticity")) is False]}


def _abs_errors(runs: list[dict[str, Any]], key: str = "error"
                ) -> dict[str, dict[str, float | int | None]]:
    errs = {k: [abs(e[k]) for r in runs if (e := r.get(key)) and e.get(k) is not None]
            for k in ("throughput_seq_s", "latency_p99len_s")}
    return {k: {"mean": statistics.fmean(v) if v else None, "max": max(v) if v else None,
                "rows": len(v)} for k, v in errs.items()}


def _f(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return format(x, fmt)


def _pct(x: float | None) -> str:
    return "" if x is None else f" ({x * 100:+.0f}%)"


def _sem(x: float | None) -> str:
    return "" if x is None else f" +- {x:.2g}"


def _bound(b: float | None) -> str:
    return "none" if b is None else f"{b:.3g} s"


def _load(measured: dict[str, Any]) -> str:
    """The machine's 1-minute load average at the end of the run (2 cores: > 2 = contended)."""
    loads = measured.get("load_avg_1min") or []
    return "/".join(f"{x:.1f}" for x in loads) or "-"


def _row_md(r: dict[str, Any], static: dict[str, Any] | None) -> str:
    pr, me, er = r.get("predicted") or {}, r.get("measured") or {}, r.get("error") or {}
    plan = r.get("plan") or {}
    met = "-" if not me else ("yes" if me.get("bound_met") else "**no**")
    vs = ratio(r, static)
    note = r.get("note") or ""
    if r.get("reused_from"):
        note = (note + "; " if note else "") + f"same plan as {r['reused_from']}"
    cells = [r["policy"], plan.get("policy", "-"), plan.get("knobs", "-"),
             _f(pr.get("throughput_seq_s")),
             _f(me.get("throughput_seq_s")) + _pct(er.get("throughput_seq_s")),
             _f(me.get("throughput_tok_s"), ".1f"),
             _f(comparable(pr, "latency_p99len_s")),
             _f(me.get("latency_p99len_s")) + _pct(er.get("latency_p99len_s"))
             + _sem(me.get("latency_p99len_sem_s")),
             _f(worst(r.get("elasticity"), "latency_p99len_s"), ".2g"),
             _f(me.get("cpu_stretch"), ".2f"),
             _f(me.get("latency_p99_s")), _f(me.get("ttft_s")), _f(me.get("tpot_s")),
             "-" if vs is None else f"{vs:.2f}x", met, _load(me), note.replace("|", "/")]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| policy | plan | knobs | pred seq/s | meas seq/s (err) | meas tok/s | "
          "pred p99-len lat (s) | meas p99-len lat (s) (err) +- s.e. | lat. elasticity | "
          "CPU stretch | "
          "meas p99 (s) | TTFT (s) | TPOT (s) | vs static | bound met | load | note |")


def render_md(results: dict[str, Any]) -> str:
    meta, bounds = results["meta"], results["bounds"]
    kind = "null model" if meta["null_model"] else meta["dtype"]
    eos = "natural" if meta["config"]["natural_eos"] else "ignored up to the drawn length"
    lines = [f"# exegpt bench: {meta['model']} ({kind})",
             "", f"- workload: {meta['workload_description']}; {meta['requests']} requests "
             f"({meta['probes']} p99-length probes, p99 output {meta['p99_output']} tokens)",
             f"- workers: {meta['config']['workers']}; repeats: {meta['config']['repeats']}; "
             f"EOS: {eos}; planned for at most "
             f"{meta.get('max_in_flight') or 'any number of'} requests in flight",
             f"- profile: {meta['profile']}",
             f"- machine: {meta['machine']['num_cpus']} CPUs, load average "
             f"{', '.join(f'{x:.1f}' for x in meta['machine']['load_avg_1_5_15'])} at the end "
             "(shared: timings are noisy)",
             f"- bounds ({bounds['mode']}): "
             + ", ".join(_bound(b) for b in bounds["bounds"]), ""]
    table = _by_bound(results["rows"])
    for b in sorted(table, key=lambda x: math.inf if x is None else x):
        lines += [f"## bound {_bound(b)}", "", HEADER, "|" + "---|" * HEADER.count(" |")]
        static = table[b].get("static")
        lines += [_row_md(r, static) for r in table[b].values()]
        lines.append("")
    lines += _reference_md(results.get("reference") or {})
    lines += _headline_md(headline(results["rows"]))
    return "\n".join(lines) + "\n"


def _reference_md(ref: dict[str, Any]) -> list[str]:
    lines = ["## transformers `generate` (static batching, same prompts)", ""]
    if "skipped" in ref:
        return lines + [f"skipped: {ref['skipped']}", ""]
    m = ref["measured"]
    return lines + [f"batch {ref['batch']}, {ref['torch_threads']} torch threads: "
                    f"{_f(m.get('throughput_seq_s'))} seq/s steady "
                    f"({_f(m.get('throughput_makespan_seq_s'))} over the makespan), "
                    f"{_f(m.get('throughput_tok_s'), '.1f')} tok/s, p99-length latency "
                    f"{_f(m.get('latency_p99len_s'))} s, p99 latency "
                    f"{_f(m.get('latency_p99_s'))} s",
                    ""]


def _headline_md(h: dict[str, Any]) -> list[str]:
    lines = ["## headline", "", "| bound | exegpt met | exegpt / static | exegpt / continuous |",
             "|---|---|---|---|"]
    for p in h["per_bound"]:
        lines.append(f"| {_bound(p['bound_s'])} | {'yes' if p['met'] else 'no'} | "
                     f"{_f(p['vs_static'], '.2f')} | {_f(p['vs_continuous'], '.2f')} |")
    err = h["abs_error"]
    lines += ["", f"- mean exegpt / static over bounds exegpt met: "
              f"{_f(h['mean_vs_static_met'], '.2f')}; / continuous at the two tightest: "
              f"{_f(h['mean_vs_continuous_two_tightest_met'], '.2f')}",
              f"- planner error |measured - predicted| / predicted over "
              f"{err['throughput_seq_s']['rows']} runs K fills: throughput mean "
              f"{_f(err['throughput_seq_s']['mean'], '.1%')} max "
              f"{_f(err['throughput_seq_s']['max'], '.1%')}; p99-length latency mean "
              f"{_f(err['latency_p99len_s']['mean'], '.1%')} max "
              f"{_f(err['latency_p99len_s']['max'], '.1%')}"]
    good = h["abs_error_well_conditioned"]
    lines.append(f"- the same over the {good['throughput_seq_s']['rows']} of them whose "
                 "predicted p99-length latency a 5% error of the profile's decode or encode "
                 "cost moves by at most ~10% (|elasticity| <= 2): throughput mean "
                 f"{_f(good['throughput_seq_s']['mean'], '.1%')}, p99-length latency mean "
                 f"{_f(good['latency_p99len_s']['mean'], '.1%')}")
    load = h["abs_error_at_run_load"]
    if load["throughput_seq_s"]["rows"]:
        lines.append(f"- against each run's prediction scaled by its CPU stretch over the "
                     f"calibration runs' ({load['throughput_seq_s']['rows']} runs): throughput "
                     f"mean {_f(load['throughput_seq_s']['mean'], '.1%')}, p99-length latency "
                     f"mean {_f(load['latency_p99len_s']['mean'], '.1%')}")
    for r in h["ill_conditioned"]:
        lines.append(f"  - left out: {r['policy']} at bound {_bound(r['bound_s'])}, latency "
                     f"elasticity {_f(r['latency_elasticity'], '.2g')}")
    return lines + [""]


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "headline": headline(results["rows"])}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(strict_json(results), indent=1, default=str,
                                    allow_nan=False))
    md_path.write_text(render_md(results))
    return json_path, md_path


def strict_json(tree: Any) -> Any:
    """Non-finite floats -> None, so results.json is strict JSON every parser reads."""
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: strict_json(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [strict_json(v) for v in tree]
    return tree
