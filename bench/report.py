"""The bench run's report: the markdown table, the targets, who was busy, and the PNG chart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

WAYS = ("direct", "broker", "litellm", "grpc-null")
TITLES = {"direct": "direct", "broker": "broker", "litellm": "LiteLLM", "grpc-null": "gRPC floor"}

# (workload, label, key, lower_is_better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("unary_c1", "unary c=1: latency p50 (ms)", "p50_ms", True),
    ("unary_c1", "unary c=1: latency p99 (ms)", "p99_ms", True),
    ("unary_c32", "unary c=32: throughput (req/s)", "rps", False),
    ("unary_c32", "unary c=32: server CPU per request (us)", "server_cpu_us_per_req", True),
    ("unary_c256", "unary c=256: throughput (req/s)", "rps", False),
    ("stream20_c1", "stream 20 chunks c=1: TTFT p50 (ms)", "ttft_p50_ms", True),
    ("stream20_c1", "stream 20 chunks c=1: TTFT p99 (ms)", "ttft_p99_ms", True),
    ("stream20_c1", "stream 20 chunks c=1: total p50 (ms)", "p50_ms", True),
    ("stream200_c1", "stream 200 chunks c=1: TTFT p50 (ms)", "ttft_p50_ms", True),
    ("stream200_c1", "stream 200 chunks c=1: TTFT p99 (ms)", "ttft_p99_ms", True),
    ("stream200_c1", "stream 200 chunks c=1: total p50 (ms)", "p50_ms", True),
    ("stream200_c1", "stream 200 chunks c=1: total p99 (ms)", "p99_ms", True),
    ("stream20_c32", "stream 20 chunks c=32: streams/s", "rps", False),
    ("stream20_c32", "stream 20 chunks c=32: chunks/s", "chunks_per_s", False),
    ("stream20_c32", "stream 20 chunks c=32: server CPU per stream (us)", "server_cpu_us_per_req", True),
    ("stream200_c32", "stream 200 chunks c=32: streams/s", "rps", False),
    ("stream200_c32", "stream 200 chunks c=32: chunks/s", "chunks_per_s", False),
    (
        "stream200_c32",
        "stream 200 chunks c=32: chunks per server CPU-second",
        "chunks_per_server_cpu_s",
        False,
    ),
    (
        "stream200_c32",
        "stream 200 chunks c=32: messages per stream to the caller",
        "messages_per_stream",
        True,
    ),
    ("embed16_c1", "embed 16 inputs c=1: latency p50 (ms)", "p50_ms", True),
    ("embed16_c1", "embed 16 inputs c=1: latency p99 (ms)", "p99_ms", True),
    ("embed16_c32", "embed 16 inputs c=32: calls/s", "rps", False),
    ("embed16_c32", "embed 16 inputs c=32: server CPU per call (us)", "server_cpu_us_per_req", True),
    ("hold1000", "1,000 open streams: most open at once", "max_open", False),
    ("hold1000", "1,000 open streams: errors", "errors", True),
    ("hold1000", "1,000 open streams: server RSS peak (MB)", "server_rss_mb_peak", True),
]


def _get(out: dict[str, Any], workload: str, way: str, key: str) -> float | None:
    v = out["workloads"].get(workload, {}).get(way, {}).get(key)
    return float(v) if isinstance(v, int | float) else None


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def markdown(out: dict[str, Any]) -> str:
    has_floor = any("grpc-null" in w for w in out["workloads"].values())
    cols = ["direct", "broker", "litellm"] + (["grpc-null"] if has_floor else [])
    lines = [
        "| figure | " + " | ".join(TITLES[c] for c in cols) + " | broker - direct | broker / LiteLLM |",
        "|---|" + "---:|" * (len(cols) + 2),
    ]
    for workload, label, key, lower in ROWS:
        if workload not in out["workloads"]:
            continue
        vals = {c: _get(out, workload, c, key) for c in cols}
        if key in ("chunks_per_server_cpu_s", "server_cpu_us_per_req"):
            vals["direct"] = None  # direct has no server in between: its "server" is the upstream
        b, d, ll = vals["broker"], vals["direct"], vals["litellm"]
        diff = _fmt(b - d) if lower and b is not None and d is not None and key.endswith("_ms") else ""
        ratio = f"{b / ll:.2f}x" if b is not None and ll else ""
        lines.append(f"| {label} | " + " | ".join(_fmt(vals[c]) for c in cols) + f" | {diff} | {ratio} |")
    m = out["machine"]
    parts = ["\n".join(lines), "", "Targets:", "", "| target | value | met |", "|---|---:|:---:|"]
    for name, value, ok in targets(out):
        parts.append(f"| {name} | {value} | {'yes' if ok else ('no' if ok is not None else 'n/a')} |")
    parts += [
        "",
        "Who was busy (CPU % of one core in each measured window: load generator / server / upstream):",
        "",
    ]
    parts += busy_table(out)
    parts += [
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}; Python {m['python']}, grpcio {m['grpcio']}, "
        f"{m['litellm']}; load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{m.get('loadavg_end', (0,))[0]:.2f} at the end (other processes on the machine add noise).",
    ]
    for note in out.get("notes", []):
        parts.append(f"NOTE: {note}")
    return "\n".join(parts)


def busy_table(out: dict[str, Any]) -> list[str]:
    present = [w for w in WAYS if any(w in v for v in out["workloads"].values())]
    lines = ["| workload | " + " | ".join(TITLES[w] for w in present) + " |", "|---|" + "---|" * len(present)]
    for name, row in out["workloads"].items():
        cells = []
        for way in present:
            r = row.get(way)
            if not r or "loadgen_cpu_pct" not in r:
                cells.append("-")
                continue
            cells.append(
                f"{r['loadgen_cpu_pct']:.0f} / {r.get('server_cpu_pct', 0):.0f} / {r.get('upstream_cpu_pct', 0):.0f}"
                if way != "direct"
                else f"{r['loadgen_cpu_pct']:.0f} / - / {r.get('server_cpu_pct', 0):.0f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(out: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    g: Callable[[str, str, str], float | None] = lambda w, way, k: _get(out, w, way, k)  # noqa: E731
    res: list[tuple[str, str, bool | None]] = []

    def added(label: str, w: str, key: str, limit: float) -> None:
        b, d = g(w, "broker", key), g(w, "direct", key)
        if b is None or d is None:
            res.append((label, "-", None))
        else:
            res.append((label, f"{b - d:.2f} ms", b - d <= limit))

    added("unary: added latency p50 <= 1 ms (c=1)", "unary_c1", "p50_ms", 1.0)
    added("unary: added latency p99 <= 3 ms (c=1)", "unary_c1", "p99_ms", 3.0)
    added("stream: added TTFT p50 <= 1 ms (c=1, 20 chunks)", "stream20_c1", "ttft_p50_ms", 1.0)
    added("stream: added TTFT p99 <= 3 ms (c=1, 20 chunks)", "stream20_c1", "ttft_p99_ms", 3.0)
    for w, label in (
        ("unary_c32", "unary throughput >= 5x LiteLLM (c=32)"),
        ("unary_c256", "unary throughput >= 5x LiteLLM (c=256)"),
        ("stream20_c32", "streaming throughput >= 5x LiteLLM (20 chunks, c=32)"),
        ("stream200_c32", "streaming throughput >= 5x LiteLLM (200 chunks, c=32)"),
    ):
        b, ll = g(w, "broker", "rps"), g(w, "litellm", "rps")
        res.append(
            (
                label,
                f"{b / ll:.1f}x" if b is not None and ll else "-",
                (b / ll >= 5) if b is not None and ll else None,
            )
        )
    c = g("stream200_c32", "broker", "chunks_per_server_cpu_s")
    res.append(
        (
            "relayed chunks per second per core >= 20,000 (per daemon CPU-second)",
            _fmt(c),
            c >= 20_000 if c is not None else None,
        )
    )
    rss, errs, most = (g("hold1000", "broker", k) for k in ("server_rss_mb_peak", "errors", "max_open"))
    res.append(
        (
            "1,000 concurrent streams: daemon RSS <= 300 MB",
            f"{_fmt(rss)} MB",
            rss <= 300 if rss is not None else None,
        )
    )
    res.append(
        (
            "1,000 concurrent streams: no error (and all 1,000 open at once)",
            f"{_fmt(errs)} errors, {_fmt(most)} open",
            errs == 0 and most == 1000 if errs is not None and most is not None else None,
        )
    )
    return res


def progress_line(workload: str, way: str, r: dict[str, Any]) -> str:
    bits = [f"{workload:14} {way:9}", f"ok={r.get('ok', 0)}", f"err={r.get('errors', 0)}"]
    for key, label in (
        ("rps", "rps"),
        ("p50_ms", "p50"),
        ("p99_ms", "p99"),
        ("ttft_p50_ms", "ttft50"),
        ("chunks_per_s", "chunks/s"),
        ("max_open", "open"),
        ("server_rss_mb_peak", "rss_peak_mb"),
        ("loadgen_cpu_pct", "gen%"),
        ("server_cpu_pct", "srv%"),
    ):
        if r.get(key) is not None:
            bits.append(f"{label}={_fmt(float(r[key]))}")
    if r.get("error_samples"):
        bits.append(f"first error: {r['error_samples'][0][:200]}")
    return " ".join(bits)


def chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (
            "unary latency, c=1 (ms, log)",
            [("unary_c1", "p50_ms", "p50"), ("unary_c1", "p99_ms", "p99")],
            True,
        ),
        (
            "unary throughput (req/s, log)",
            [("unary_c32", "rps", "c=32"), ("unary_c256", "rps", "c=256")],
            True,
        ),
        (
            "stream time to first token, c=1 (ms, log)",
            [
                ("stream20_c1", "ttft_p50_ms", "20ch p50"),
                ("stream200_c1", "ttft_p50_ms", "200ch p50"),
                ("stream20_c1", "ttft_p99_ms", "20ch p99"),
            ],
            True,
        ),
        (
            "stream throughput, c=32 (chunks/s, log)",
            [("stream20_c32", "chunks_per_s", "20 chunks"), ("stream200_c32", "chunks_per_s", "200 chunks")],
            True,
        ),
        ("1,000 open streams: server RSS peak (MB)", [("hold1000", "server_rss_mb_peak", "RSS")], False),
    ]
    ways = [w for w in WAYS if any(w in v for v in out["workloads"].values())]
    colors = {"direct": "#999999", "broker": "#1f77b4", "litellm": "#d62728", "grpc-null": "#2ca02c"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (title, series, log) in zip(axes, panels, strict=True):
        width = 0.8 / len(ways)
        for i, way in enumerate(ways):
            ys = [(_get(out, w, way, k) or 0.0) for w, k, _ in series]
            xs = [j + i * width for j in range(len(series))]
            ax.bar(xs, ys, width, label=TITLES[way], color=colors[way])
        ax.set_xticks([j + width * (len(ways) - 1) / 2 for j in range(len(series))], [s[2] for s in series])
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    m = out["machine"]
    fig.suptitle(f"model-broker bench: {m['cores']} cores, {m['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
