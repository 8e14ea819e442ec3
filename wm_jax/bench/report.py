"""The bench report: one comparison table (ours, each peer measured in the same call, the ratio, FlashDreams'
published figure on other hardware), JSON, a plot, and README markdown, all from the report document.

Re-render a committed result without a GPU:

    python -m wm_jax.bench.report benchmarks/results/bench_<...>.json [--plot docs/<...>.png] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROLLOUT_FIGURES = (  # (key in a summary, label)
    ("denoise_ms", "denoise ms (all passes), median of chunks >= {warmup}"),
    ("chunk6_denoise_ms", "denoise ms, 6th chunk"),
    ("commit_ms", "commit ms (t = 0 pass), median"),
    ("denoise_plus_commit_ms", "denoise + commit ms, median"),
)


def _peer_label(name: str, result: dict) -> str:
    return name + ("" if not result.get("error") else " (stopped)")


def ours_columns(report: dict) -> dict[str, dict]:
    """Our runs by column label: "wm_jax", or "wm_jax (<attention backend>)" when several were timed."""
    ours = report["ours"]
    return {("wm_jax" if len(ours) == 1 else f"wm_jax ({backend})"): result for backend, result in ours.items()}


def comparison_rows(report: dict) -> list[dict[str, Any]]:
    """Rows of figure / {our column: value} / {peer: value} / published, every value in ms (None where not
    measured). A stopped peer's figures are kept, but `comparable` is False for it when it finished fewer
    chunks than ours (its medians would cover the cheaper early chunks only)."""
    ours = ours_columns(report)
    published = report.get("published") or {}
    rollout_peers = {n: r for n, r in report["peers"].items() if r.get("kind") == "rollout"}
    steady = {label: r["summary"]["chunks_in_median"] for label, r in ours.items()}
    comparable = {n: all((r.get("summary") or {}).get("chunks_in_median") == c for c in steady.values())
                  for n, r in rollout_peers.items()}
    rows = []
    for key, label in ROLLOUT_FIGURES:
        rows.append({"figure": label.format(warmup=report["options"]["warmup_chunks"]),
                     "ours": {column: r["summary"].get(key) for column, r in ours.items()},
                     "peers": {n: (r.get("summary") or {}).get(key) for n, r in rollout_peers.items()},
                     "comparable": comparable,
                     "published": published.get({"chunk6_denoise_ms": "denoise_ms"}.get(key, key))
                     if key in ("chunk6_denoise_ms", "commit_ms") else None})
    forwards = {column: r["forward"] for column, r in ours.items() if (r.get("forward") or {}).get("median_ms")}
    tokens = next(iter(forwards.values()))["tokens"] if forwards else "?"
    for name, result in report["peers"].items():
        if result.get("kind") != "forward":
            continue
        summaries = result.get("forward_summary") or {}
        for variant in ("eager", "compiled"):
            if variant == "compiled" and variant not in summaries and not result.get("job", {}).get("compile"):
                continue
            rows.append({"figure": f"DiT forward ms, {tokens} tokens, bidirectional ({name} {variant})",
                         "ours": {column: (forwards.get(column) or {}).get("median_ms") for column in ours},
                         "peers": {name: (summaries.get(variant) or {}).get("median_ms")},
                         "comparable": {name: True}, "published": None})
    return rows


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(peer, ours, comparable: bool = True) -> str:
    return "-" if not peer or not ours or not comparable else f"{peer / ours:.2f}x"


def _table(report: dict, peer_label, ratio_label, published_label) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the comparison: figure, our columns, then per peer its value and one ratio per
    our column (peer ms / our ms: > 1 means we are faster), then the published figure."""
    columns = list(ours_columns(report))
    published = report.get("published") or {}
    headers = ["figure", *columns]
    for n, r in report["peers"].items():
        headers.append(peer_label(n, r))
        headers += [ratio_label(n, c) for c in columns]
    if published:
        headers.append(published_label(published))
    cells = []
    for row in comparison_rows(report):
        line = [row["figure"], *(_ms(row["ours"][c]) for c in columns)]
        for n in report["peers"]:
            if n in row["peers"]:
                value = row["peers"][n]
                line += [_ms(value), *(_ratio(value, row["ours"][c], row["comparable"][n]) for c in columns)]
            else:
                line += [""] * (1 + len(columns))
        if published:
            line.append(_ms(row["published"]))
        cells.append(line)
    return headers, cells


def format_report(report: dict) -> str:
    from wm_jax.bench.common import format_table

    opts = report["options"]
    ours = ours_columns(report)
    first = next(iter(ours.values()))
    ceiling = report["matmul_ceiling"]
    lines = [f"{report['slug']} {opts['pixel_height']}x{opts['pixel_width']}, {opts['dtype']}, {first['num_devices']} "
             f"x {report['device_kind']}, {report['date'][:10]}: medians of chunks >= {opts['warmup_chunks']} "
             f"({first['summary']['chunks_in_median']} chunks); matmul ceiling measured now: "
             f"{ceiling['tflops']:.3g} TFLOP/s"]
    single = len(ours) == 1
    headers, cells = _table(report, _peer_label,
                            lambda n, c: f"{n} / {c}" if single else f"{n} / {c.removeprefix('wm_jax ')}",
                            lambda p: f"FlashDreams {p['hardware']} (published)")
    lines += [format_table(headers, cells), ""]
    rows = [["end to end ms per step (encode + denoise + commit + decode "
             f"{first['summary']['end_to_end_decoder']})"], ["generated frames per second, end to end"]]
    rows += [[f"decode {n} ms"] for n in first["summary"]["decode_ms"]]
    rows += [["denoise FLOP utilisation (of the measured ceiling)"], ["compile s (denoise + commit)"],
             ["peak device memory GiB"]]
    for r in ours.values():
        s = r["summary"]
        values = [_ms(s["end_to_end_ms"]), "-" if not s.get("generated_fps") else f"{s['generated_fps']:.1f}",
                  *(_ms(v) for v in s["decode_ms"].values()),
                  "-" if s["denoise_utilisation"] is None else f"{100 * s['denoise_utilisation']:.1f} %",
                  f"{r['compile_s']['denoise']:.1f} + {r['compile_s']['commit']:.1f}",
                  "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"]
        for row, value in zip(rows, values):
            row.append(value)
    for n, r in report["peers"].items():
        if r.get("peak_memory_gib") is not None:
            rows.append([f"peak device memory GiB, {n}", f"{r['peak_memory_gib']:.2f}", *[""] * (len(ours) - 1)])
    lines.append(format_table(["", *ours], rows))
    for n, r in report["peers"].items():
        if r.get("error"):
            lines.append(f"{n} stopped after {len(r.get('chunks') or [])} chunks: {r['error']}")
        for w in r.get("checkout_warnings", []):
            lines.append(f"warning: {w}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """README table: one row per figure, peers measured in the same call, published figures marked."""
    headers, cells = _table(report, lambda n, r: f"{n} (same call)",
                            lambda n, c: f"ratio to {c}", lambda p: f"FlashDreams, published, {p['hardware']}")
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(out)


def plot(report: dict, path: str | Path) -> None:
    """Per-chunk denoise ms over the rollout (each of our columns and each rollout peer) and a bar of the
    medians (denoise and commit; forward medians for forward peers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = ours_columns(report)
    warm = report["options"]["warmup_chunks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    series = {label: (r["summary"], [c for c in r["chunks"] if c["rollout"] == 0]) for label, r in ours.items()}
    for name, result in report["peers"].items():
        if result.get("kind") == "rollout" and result.get("chunks"):
            series[name] = (result["summary"], result["chunks"])
    for name, (_, chunks) in series.items():
        left.plot([c["autoregressive_index"] for c in chunks], [c["denoise_ms"] for c in chunks], marker="o",
                  label=name)
    left.axvspan(-0.5, warm - 0.5, color="0.9", label=f"left out of the medians (chunks < {warm})")
    left.set_xlabel("chunk (AR step)")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("denoise ms (all passes)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    left.set_title(f"{report['slug']}: denoise per chunk")

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels, values, colors = [], [], []
    for i, (name, (summary, _)) in enumerate(series.items()):
        for key, short in (("denoise_ms", "denoise"), ("commit_ms", "commit")):
            if summary.get(key) is not None:
                labels.append(f"{name}\n{short}")
                values.append(summary[key])
                colors.append(palette[i % len(palette)])
    for i, (label, r) in enumerate(ours.items()):
        if (r.get("forward") or {}).get("median_ms"):
            labels.append(f"{label}\nforward")
            values.append(r["forward"]["median_ms"])
            colors.append(palette[i % len(palette)])
    forward_peers = [(n, r) for n, r in report["peers"].items() if r.get("kind") == "forward"]
    for j, (name, result) in enumerate(forward_peers):
        for variant, s in (result.get("forward_summary") or {}).items():
            if s.get("median_ms"):
                labels.append(f"{name}\n{variant} forward")
                values.append(s["median_ms"])
                colors.append(palette[(len(series) + j) % len(palette)])
    bars = right.bar(range(len(values)), values, color=colors)
    right.bar_label(bars, fmt="%.0f", fontsize=7)
    right.set_xticks(range(len(values)), labels, fontsize=7, rotation=60, ha="right")
    right.set_ylabel(f"ms: median of chunks >= {warm}; forward: of calls")
    first = next(iter(ours.values()))
    right.set_title(f"{first['num_devices']} x {report['device_kind']}, {report['date'][:10]}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Re-render a wm-jax bench result: table, plot, README markdown.")
    p.add_argument("json")
    p.add_argument("--plot", default=None, help="write the plot here (PNG)")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    args = p.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    print(format_report(report))
    if args.markdown:
        print()
        print(markdown(report))
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
