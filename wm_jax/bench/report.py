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


def comparison_rows(report: dict) -> list[dict[str, Any]]:
    """Rows of figure / ours / {peer: value} / published, every value in ms (None where not measured), computed
    from the report's raw figures (tables and markdown call it, so a re-render never reads stale rows)."""
    ours = report["ours"]
    published = report.get("published") or {}
    rollout_peers = {n: r for n, r in report["peers"].items() if r.get("kind") == "rollout"}
    rows = []
    for key, label in ROLLOUT_FIGURES:
        rows.append({"figure": label.format(warmup=report["options"]["warmup_chunks"]), "ours": ours["summary"].get(key),
                     "peers": {n: (r.get("summary") or {}).get(key) for n, r in rollout_peers.items()},
                     "published": published.get({"chunk6_denoise_ms": "denoise_ms"}.get(key, key))
                     if key in ("chunk6_denoise_ms", "commit_ms") else None})
    forward = ours.get("forward") or {}
    for name, result in report["peers"].items():
        if result.get("kind") != "forward":
            continue
        summaries = result.get("forward_summary") or {}
        for variant in ("eager", "compiled"):
            if variant not in summaries and result.get("error") is None and variant == "compiled" \
                    and not result.get("job", {}).get("compile"):
                continue
            rows.append({"figure": f"DiT forward ms, {forward.get('tokens', '?')} tokens, bidirectional "
                                   f"({name} {variant})",
                         "ours": forward.get("median_ms"),
                         "peers": {name: (summaries.get(variant) or {}).get("median_ms")},
                         "published": None})  # FlashDreams' bidirectional figure is per sampling step (CFG)
    return rows


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(peer, ours) -> str:
    return "-" if not peer or not ours else f"{peer / ours:.2f}x"


def format_report(report: dict) -> str:
    from wm_jax.bench.common import format_table

    ours, opts = report["ours"], report["options"]
    s = ours["summary"]
    ceiling = report["matmul_ceiling"]
    peer_names = list(report["peers"])
    published = report.get("published") or {}
    lines = [f"{report['slug']} {opts['height']}x{opts['width']}, {opts['dtype']}, {ours['num_devices']} x "
             f"{report['device_kind']}, {report['date'][:10]}: medians of chunks >= {opts['warmup_chunks']} "
             f"({s['chunks_in_median']} chunks); matmul ceiling measured now: {ceiling['tflops']:.3g} TFLOP/s"]
    headers = ["figure", "wm_jax"]
    for n in peer_names:
        headers += [_peer_label(n, report["peers"][n]), f"{n} / wm_jax"]
    if published:
        headers.append(f"FlashDreams {published['hardware']} (published)")
    table = []
    for row in comparison_rows(report):
        cells = [row["figure"], _ms(row["ours"])]
        for n in peer_names:
            value = row["peers"].get(n)
            cells += [_ms(value), _ratio(value, row["ours"])] if n in row["peers"] else ["", ""]
        if published:
            cells.append(_ms(row["published"]))
        table.append(cells)
    lines.append(format_table(headers, table))
    lines.append("")
    extra = [["end to end ms per step (encode + denoise + commit + decode "
              f"{s['end_to_end_decoder']})", _ms(s["end_to_end_ms"])],
             ["generated frames per second, end to end",
              "-" if not s.get("generated_fps") else f"{s['generated_fps']:.1f}"]]
    extra += [[f"decode {n} ms", _ms(v)] for n, v in s["decode_ms"].items()]
    extra += [["denoise FLOP utilisation (of the measured ceiling)",
               "-" if s["denoise_utilisation"] is None else f"{100 * s['denoise_utilisation']:.1f} %"],
              ["compile s (denoise + commit)", f"{ours['compile_s']['denoise']:.1f} + {ours['compile_s']['commit']:.1f}"],
              ["peak device memory GiB", "-" if ours["peak_memory_gib"] is None else f"{ours['peak_memory_gib']:.2f}"]]
    for n, r in report["peers"].items():
        if r.get("peak_memory_gib") is not None:
            extra.append([f"peak device memory GiB, {n}", f"{r['peak_memory_gib']:.2f}"])
    lines.append(format_table(["wm_jax", ""], extra))
    for n, r in report["peers"].items():
        if r.get("error"):
            lines.append(f"{n} stopped after {len(r.get('chunks') or [])} chunks: {r['error']}")
        for w in r.get("checkout_warnings", []):
            lines.append(f"warning: {w}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """README table: one row per figure, peers measured in the same call, published figures marked."""
    peer_names = list(report["peers"])
    published = report.get("published") or {}
    head = ["figure", "wm_jax"]
    for n in peer_names:
        head += [f"{n} (same call)", "ratio"]
    if published:
        head.append(f"FlashDreams, published, {published['hardware']}")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in comparison_rows(report):
        cells = [row["figure"], _ms(row["ours"])]
        for n in peer_names:
            value = row["peers"].get(n)
            cells += [_ms(value), _ratio(value, row["ours"])] if n in row["peers"] else ["", ""]
        if published:
            cells.append(_ms(row["published"]))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(report: dict, path: str | Path) -> None:
    """Per-chunk denoise ms over the rollout (ours and each rollout peer) and a bar of the medians."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = report["ours"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    series = {"wm_jax": [(c["autoregressive_index"], c["denoise_ms"]) for c in ours["chunks"] if c["rollout"] == 0]}
    for name, result in report["peers"].items():
        if result.get("kind") == "rollout" and result.get("chunks"):
            series[name] = [(c["autoregressive_index"], c["denoise_ms"]) for c in result["chunks"]]
    for name, points in series.items():
        xs, ys = zip(*points)
        left.plot(xs, ys, marker="o", label=name)
    warm = report["options"]["warmup_chunks"]
    left.axvspan(-0.5, warm - 0.5, color="0.9", label=f"left out of the medians (chunks < {warm})")
    left.set_xlabel("chunk (AR step)")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylabel("denoise ms (all passes)")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    left.set_title(f"{report['slug']}: denoise per chunk")

    labels, values, colors = [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(series):
        summary = ours["summary"] if name == "wm_jax" else report["peers"][name]["summary"]
        for key, short in (("denoise_ms", "denoise"), ("commit_ms", "commit")):
            if summary.get(key) is not None:
                labels.append(f"{name}\n{short}")
                values.append(summary[key])
                colors.append(palette[i % len(palette)])
    forward = ours.get("forward") or {}
    for name, result in report["peers"].items():
        if result.get("kind") == "forward":
            if forward.get("median_ms"):
                labels.append("wm_jax\nforward")
                values.append(forward["median_ms"])
                colors.append(palette[0])
            for j, (variant, s) in enumerate((result.get("forward_summary") or {}).items()):
                if s.get("median_ms"):
                    labels.append(f"{name}\n{variant}")
                    values.append(s["median_ms"])
                    colors.append(palette[(len(series) + j) % len(palette)])
    bars = right.bar(range(len(values)), values, color=colors)
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(range(len(values)), labels, fontsize=7)
    right.set_ylabel(f"ms, median of chunks >= {warm} (forward: median of calls)")
    right.set_title(f"{ours['num_devices']} x {report['device_kind']}, {report['date'][:10]}")
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
