"""Turns timings into result rows (one per implementation x config x mode) and
writes them as a terminal table, JSON lines, Markdown and a bar chart.

Definitions (also in docs/performance.md, "The benchmark suite"):

- ``tokens_per_s`` = ``B * T`` / seconds per call (a convolutional cell's
  token is a frame); the median over the rounds, with the min and max (from
  the slowest and fastest round).
- ``ratio_vs[peer]`` = this row's median tokens/s / the peer's median
  tokens/s, same config and mode (> 1: this row is faster). For an rnnjax
  row it is "rnnjax relative to the peer"; rnnjax variants (``rnnjax-hoisted``
  ...) are also compared with the default ``rnnjax`` (``ratio_vs["rnnjax"]``).
- ``gflops`` = analytic matmul and convolution FLOPs (:func:`benchmarks.config.flops`) /
  median seconds / 1e9.
- ``peak_gflops_jax`` / ``peak_gflops_torch``: median GFLOP/s of a float32
  ``[n, n] x [n, n]`` matmul (``jnp.dot`` jitted / ``torch.mm``) timed in the
  same rounds; ``pct_peak`` = ``gflops`` / the higher of the two, in percent
  (``pct_peak_jax``, ``pct_peak_torch`` against each).
- ``memory_bytes``: ``memory_kind`` says what it is: ``xla-planned`` (XLA's
  planned peak for one call: arguments + outputs + temporaries - aliased
  donations, from ``compiled.memory_analysis()``), ``rss-delta`` (torch: the
  growth of the resident set during one steady-state call, measured in a
  subprocess; parameters and inputs excluded), or ``n/a``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from benchmarks.config import Config, flops
from benchmarks.impls import is_rnnjax

PEAK_PREFIX = "peak:"


def peak_stats(results: dict[str, dict], peak_flops: dict[str, int]) -> dict[str, dict]:
    """GFLOP/s (median, min, max) of each matmul-peak runner in ``results``."""
    out = {}
    for name, fl in peak_flops.items():
        r = results.get(PEAK_PREFIX + name)
        if r and "median_s" in r:
            out[name] = dict(gflops=fl / r["median_s"] / 1e9, gflops_min=fl / r["max_s"] / 1e9,
                             gflops_max=fl / r["min_s"] / 1e9, size=round((fl / 2) ** (1 / 3)))
    return out


def make_rows(cfg: Config, results: dict[str, dict], infos: dict[str, dict], notes: dict[str, str],
              peaks: dict[str, dict], *, rounds: int, env: dict) -> list[dict]:
    """One row per implementation of ``cfg`` (at ``cfg.mode``) that ran, with ratios filled in."""
    fl = flops(cfg)
    peak_jax = peaks.get("jax.dot", {}).get("gflops")
    peak_torch = peaks.get("torch.mm", {}).get("gflops")
    best_peak = max((p for p in (peak_jax, peak_torch) if p), default=None)
    rows = []
    for name, r in results.items():
        if name.startswith(PEAK_PREFIX) or "median_s" not in r:
            continue
        info = infos.get(name, {})
        row_flops = info.get("flops", fl)  # rnnjax-dense: the one-head cell's count
        gflops = row_flops / r["median_s"] / 1e9
        rows.append(dict(
            impl=name, config=cfg.label(), preset=cfg.preset, cell=cfg.cell, mode=cfg.mode,
            batch=cfg.batch, time=cfg.time, features=cfg.features, hidden=cfg.hidden, spatial=list(cfg.spatial),
            kernel=cfg.kernel, layers=cfg.layers,
            bidirectional=cfg.bidirectional, dtype=cfg.dtype, tokens=cfg.tokens, rounds=rounds,
            median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"], samples_s=r["samples_s"],
            tokens_per_s=cfg.tokens / r["median_s"], tokens_per_s_min=cfg.tokens / r["max_s"],
            tokens_per_s_max=cfg.tokens / r["min_s"],
            first_call_s=r["first_call_s"], compile_s=info.get("compile_s"),
            heads=cfg.heads, flops=row_flops, gflops=gflops,
            peak_gflops_jax=peak_jax, peak_gflops_torch=peak_torch,
            pct_peak=100 * gflops / best_peak if best_peak else None,
            pct_peak_jax=100 * gflops / peak_jax if peak_jax else None,
            pct_peak_torch=100 * gflops / peak_torch if peak_torch else None,
            memory_bytes=info.get("memory_bytes"), memory_kind=info.get("memory_kind", "n/a"),
            xla_peak_bytes=info.get("xla_peak_bytes"), matmul_flops=info.get("matmul_flops"),
            matmul_gflops=info["matmul_flops"] / r["median_s"] / 1e9 if info.get("matmul_flops") else None,
            ratio_vs={}, note=notes.get(name, ""), env=env,
        ))
    add_ratios(rows)
    return rows


def _baselines(row: dict) -> bool:
    """Rows others are compared with: every peer, and default ``rnnjax`` for the rnnjax variants."""
    return not is_rnnjax(row["impl"]) or row["impl"] == "rnnjax"


def add_ratios(rows: list[dict]) -> None:
    """Fills ``ratio_vs[other]`` = tokens/s of the row / tokens/s of ``other``, same config and
    mode, for every peer (non-rnnjax) row, and for rnnjax variants also against default ``rnnjax``."""
    for row in rows:
        row["ratio_vs"] = {
            other["impl"]: row["tokens_per_s"] / other["tokens_per_s"]
            for other in rows
            if other is not row and _baselines(other)
            and (is_rnnjax(row["impl"]) or not is_rnnjax(other["impl"]))
            and (other["config"], other["mode"]) == (row["config"], row["mode"])
        }


# --- formatting -------------------------------------------------------------------------------


def si(x: float | None) -> str:
    """1234567 -> '1.23M'."""
    if x is None or not math.isfinite(x):
        return "n/a"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _memory(row: dict) -> str:
    if row["memory_bytes"] is None:
        return "n/a"
    kind = {"xla-planned": "xla", "rss-delta": "rss"}.get(row["memory_kind"], row["memory_kind"])
    return f"{row['memory_bytes'] / 2 ** 20:.1f} {kind}"


def peers_in(rows: Iterable[dict]) -> list[str]:
    """The "vs" columns: each peer, preceded by ``rnnjax`` when rnnjax variants are compared with it."""
    rows = list(rows)
    seen: list[str] = []
    if any(is_rnnjax(r["impl"]) and r["impl"] != "rnnjax" for r in rows) and any(r["impl"] == "rnnjax" for r in rows):
        seen.append("rnnjax")
    for row in rows:
        if not is_rnnjax(row["impl"]) and row["impl"] not in seen:
            seen.append(row["impl"])
    return seen


def columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table."""
    peers = peers_in(rows)
    header = ["impl", "config", "mode", "tok/s median [min-max]", *[f"vs {p}" for p in peers],
              "GFLOP/s", "% peak", "1st call s", "mem MB"]
    body = []
    for row in rows:
        ratios = ["-" if p == row["impl"] else format(row["ratio_vs"][p], ".2f") if p in row["ratio_vs"] else ""
                  for p in peers]
        body.append([
            row["impl"], row["config"], row["mode"],
            f"{si(row['tokens_per_s'])} [{si(row['tokens_per_s_min'])}-{si(row['tokens_per_s_max'])}]",
            *ratios, _num(row["gflops"], ".1f"), _num(row["pct_peak"], ".0f"), _num(row["first_call_s"], ".2f"),
            _memory(row),
        ])
    return header, body


def peak_line(peaks: dict[str, dict]) -> str:
    if not peaks:
        return "float32 matmul peak: n/a"
    parts = [f"{name} {p['gflops']:.1f} GFLOP/s [{p['gflops_min']:.1f}-{p['gflops_max']:.1f}]"
             for name, p in peaks.items()]
    size = next(iter(peaks.values()))["size"]
    return f"float32 matmul peak ({size}^3, same rounds): " + ", ".join(parts)


def text_table(rows: list[dict]) -> str:
    header, body = columns(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def markdown(rows: list[dict], peaks_by_group: list[tuple[str, dict]]) -> str:
    header, body = columns(rows)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    out.append("")
    out += [f"- {label}: {peak_line(peaks)}" for label, peaks in peaks_by_group]
    return "\n".join(out) + "\n"


def json_line(row: dict) -> str:
    return json.dumps(row, sort_keys=False)


# --- plot ----------------------------------------------------------------------------------------


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars of median tokens/s (log scale): one panel per mode, one group per config,
    one bar per implementation; each peer's bar is labelled with rnnjax's ratio to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    width_in = 2.0 + max(4.0, 0.45 * len(configs) * len(impls))
    fig, axes = plt.subplots(len(modes), 1, figsize=(width_in, 3.6 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[:, 0], modes):
        by = {(r["config"], r["impl"]): r for r in rows if r["mode"] == mode}
        for j, name in enumerate(impls):
            xs, ys, lo, hi, labels = [], [], [], [], []
            for i, config in enumerate(configs):
                row = by.get((config, name))
                if row is None:
                    continue
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(row["tokens_per_s"])
                lo.append(row["tokens_per_s"] - row["tokens_per_s_min"])
                hi.append(row["tokens_per_s_max"] - row["tokens_per_s"])
                rnnjax_row = by.get((config, "rnnjax"))
                ratio = rnnjax_row["ratio_vs"].get(name) if rnnjax_row and not is_rnnjax(name) else None
                labels.append("" if ratio is None else f"{ratio:.2f}x")
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[name], label=name, capsize=2)
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(configs)), configs, fontsize=8)
        ax.set_ylabel("tokens/s (median)")
        ax.set_title(f"{mode}: tokens/s per implementation; label on a peer = rnnjax / peer", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
