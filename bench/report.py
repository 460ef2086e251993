"""The bench run's report: the markdown table, the targets, who was busy, and the PNG chart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAYS = ("direct", "broker", "broker-w2", "litellm", "portkey", "grpc-null")
PEERS = ("litellm", "portkey")
TITLES = {
    "direct": "direct",
    "broker": "broker",
    "broker-w2": "broker --workers 2",
    "litellm": "LiteLLM",
    "portkey": "Portkey",
    "grpc-null": "gRPC floor",
}
# The table's columns: the workers daemon has rows of its own instead (Row.source).
COLUMNS = ("direct", "broker", "litellm", "portkey", "grpc-null")


@dataclass(frozen=True)
class Row:
    workload: str
    label: str
    key: str
    lower_is_better: bool
    # column -> the way whose result it shows (the workers rows put broker-w2 under "broker")
    source: dict[str, str] = field(default_factory=dict)


def _rows() -> list[Row]:
    r = Row
    w2 = {"broker": "broker-w2"}
    return [
        r("unary_c1", "unary c=1: latency p50 (ms)", "p50_ms", True),
        r("unary_c1", "unary c=1: latency p99 (ms)", "p99_ms", True),
        r("unary_c32", "unary c=32: throughput (req/s)", "rps", False),
        r("unary_c32", "unary c=32: server CPU per request (us)", "server_cpu_us_per_req", True),
        r("unary_c256", "unary c=256: throughput (req/s)", "rps", False),
        r("stream20_c1", "stream 20 chunks c=1: TTFT p50 (ms)", "ttft_p50_ms", True),
        r("stream20_c1", "stream 20 chunks c=1: TTFT p99 (ms)", "ttft_p99_ms", True),
        r("stream20_c1", "stream 20 chunks c=1: total p50 (ms)", "p50_ms", True),
        r("stream200_c1", "stream 200 chunks c=1: TTFT p50 (ms)", "ttft_p50_ms", True),
        r("stream200_c1", "stream 200 chunks c=1: TTFT p99 (ms)", "ttft_p99_ms", True),
        r("stream200_c1", "stream 200 chunks c=1: total p50 (ms)", "p50_ms", True),
        r("stream200_c1", "stream 200 chunks c=1: total p99 (ms)", "p99_ms", True),
        r("stream20_c32", "stream 20 chunks c=32: streams/s", "rps", False),
        r("stream20_c32", "stream 20 chunks c=32: chunks/s", "chunks_per_s", False),
        r("stream20_c32", "stream 20 chunks c=32: server CPU per stream (us)", "server_cpu_us_per_req", True),
        r("stream200_c32", "stream 200 chunks c=32: streams/s", "rps", False),
        r("stream200_c32", "stream 200 chunks c=32: chunks/s", "chunks_per_s", False),
        r(
            "stream200_c32",
            "stream 200 chunks c=32: chunks per server CPU-second",
            "chunks_per_server_cpu_s",
            False,
        ),
        r(
            "stream200_c32",
            "stream 200 chunks c=32: messages per stream to the caller",
            "messages_per_stream",
            True,
        ),
        r("reason20_c1", "reasoning stream 20+20 chunks c=1: TTFT p50 (ms)", "ttft_p50_ms", True),
        r("reason20_c1", "reasoning stream 20+20 chunks c=1: total p50 (ms)", "p50_ms", True),
        r("reason20_c32", "reasoning stream 20+20 chunks c=32: streams/s", "rps", False),
        r(
            "reason20_c32",
            "reasoning stream 20+20 chunks c=32: server CPU per stream (us)",
            "server_cpu_us_per_req",
            True,
        ),
        r("embed16_c1", "embed 16 inputs c=1: latency p50 (ms)", "p50_ms", True),
        r("embed16_c1", "embed 16 inputs c=1: latency p99 (ms)", "p99_ms", True),
        r("embed16_c32", "embed 16 inputs c=32: calls/s", "rps", False),
        r("embed16_c32", "embed 16 inputs c=32: server CPU per call (us)", "server_cpu_us_per_req", True),
        r("hold1000", "{n} open streams: most open at once", "max_open", False),
        r("hold1000", "{n} open streams: errors", "errors", True),
        r("hold1000", "{n} open streams: server RSS peak (MB)", "server_rss_mb_peak", True),
        r("hold10000", "{n} open streams: most open at once", "max_open", False),
        r("hold10000", "{n} open streams: errors", "errors", True),
        r("hold10000", "{n} open streams: server RSS peak (MB)", "server_rss_mb_peak", True),
        r("hold10000", "{n} open streams: server KB per open stream", "server_kb_per_open_stream", True),
        r("workers_unary_c32", "unary c=32, 16 connections: req/s, 1 worker", "rps", False),
        r("workers_unary_c32", "unary c=32, 16 connections: req/s, `--workers 2`", "rps", False, w2),
        r("workers_stream20_c32", "stream 20 chunks c=32, 16 connections: streams/s, 1 worker", "rps", False),
        r(
            "workers_stream20_c32",
            "stream 20 chunks c=32, 16 connections: streams/s, `--workers 2`",
            "rps",
            False,
            w2,
        ),
    ]


ROWS = _rows()


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


def _present(out: dict[str, Any], way: str) -> bool:
    return any(way in v for v in out["workloads"].values())


def markdown(out: dict[str, Any]) -> str:
    cols = [c for c in COLUMNS if c != "grpc-null" or _present(out, c)]
    lines = [
        "| figure | "
        + " | ".join(TITLES[c] for c in cols)
        + " | broker - direct | broker / LiteLLM | broker / Portkey |",
        "|---|" + "---:|" * (len(cols) + 3),
    ]
    for row in ROWS:
        if row.workload not in out["workloads"]:
            continue
        vals = {c: _get(out, row.workload, row.source.get(c, c), row.key) for c in cols}
        if row.source:  # a row of its own way: the other columns are the plain rows' business
            vals = {c: (v if c in row.source else None) for c, v in vals.items()}
        if row.key in ("chunks_per_server_cpu_s", "server_cpu_us_per_req", "server_kb_per_open_stream"):
            vals["direct"] = None  # direct has no server in between: its "server" is the upstream
        b, d = vals["broker"], vals["direct"]
        diff = (
            _fmt(b - d)
            if row.lower_is_better and b is not None and d is not None and row.key.endswith("_ms")
            else ""
        )
        ratios = []
        for peer in PEERS:
            v = vals.get(peer)
            ratios.append(f"{b / v:.2f}x" if b is not None and v else "")
        # Held-stream labels say how many were held (a quick run holds fewer).
        label = row.label.format(n=f"{out['workloads'][row.workload]['spec']['concurrency']:,}")
        lines.append(
            f"| {label} | "
            + " | ".join(_fmt(vals[c]) for c in cols)
            + f" | {diff} | "
            + " | ".join(ratios)
            + " |"
        )
    m = out["machine"]
    parts = ["\n".join(lines), "", "Targets:", "", "| target | value | met |", "|---|---:|:---:|"]
    for name, value, ok in targets(out):
        met = "quick run" if out.get("quick") else "yes" if ok else "no" if ok is not None else "n/a"
        parts.append(f"| {name} | {value} | {met} |")
    parts += [
        "",
        "Who was busy (CPU % of one core in each measured window: load generator / server / upstream):",
        "",
    ]
    parts += busy_table(out)
    parts += [
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}; Python {m['python']}, grpcio {m['grpcio']}, "
        f"{m['litellm']}, {m.get('portkey', '')} on Node {m.get('node') or '-'}; open-file limit "
        f"{m.get('fd_limit', '?')}; load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{m.get('loadavg_end', (0,))[0]:.2f} at the end (other processes on the machine add noise).",
    ]
    if out.get("quick"):
        parts.append(
            "QUICK RUN (BENCH_QUICK): 0.2 s windows, held streams cut twentyfold, peers run beside"
            " the others: the figures are not measurements."
        )
    for note in out.get("notes", []):
        parts.append(f"NOTE: {note}")
    return "\n".join(parts)


def busy_table(out: dict[str, Any]) -> list[str]:
    present = [w for w in WAYS if _present(out, w)]
    lines = ["| workload | " + " | ".join(TITLES[w] for w in present) + " |", "|---|" + "---|" * len(present)]
    for name, row in out["workloads"].items():
        cells = []
        for way in present:
            r = row.get(way)
            if not r or "loadgen_cpu_pct" not in r:
                cells.append("-")
                continue
            if way == "direct":
                cells.append(f"{r['loadgen_cpu_pct']:.0f} / - / {r.get('server_cpu_pct', 0):.0f}")
                continue
            cell = f"{r['loadgen_cpu_pct']:.0f} / {r.get('server_cpu_pct', 0):.0f} / {r.get('upstream_cpu_pct', 0):.0f}"
            split = [r[k] for k in sorted(r) if k.startswith("worker") and k.endswith("_cpu_pct")]
            if split:  # how evenly the kernel spread the connections over the workers
                cell += " (" + " + ".join(f"{v:.0f}" for v in split) + ")"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(out: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 19's targets, each judged from this run alone (None: not measured in it)."""
    g: Callable[[str, str, str], float | None] = lambda w, way, k: _get(out, w, way, k)  # noqa: E731
    res: list[tuple[str, str, bool | None]] = []

    def added(label: str, w: str, key: str, limit: float) -> None:
        b, d = g(w, "broker", key), g(w, "direct", key)
        if b is None or d is None:
            res.append((label, "-", None))
        else:
            res.append((label, f"{b - d:.2f} ms", b - d <= limit))

    def ratio(label: str, num: float | None, den: float | None, at_least: float, pct: bool = False) -> None:
        if num is None or not den:
            res.append((label, "-", None))
            return
        value = f"{100 * num / den:.0f}% ({_fmt(num)} of {_fmt(den)})" if pct else f"{num / den:.2f}x"
        res.append((label, value, num / den >= at_least))

    added("unary: added latency p50 <= 0.8 ms (c=1)", "unary_c1", "p50_ms", 0.8)
    added("unary: added latency p99 <= 2 ms (c=1)", "unary_c1", "p99_ms", 2.0)
    added("stream: added TTFT p50 <= 0.8 ms (c=1, 20 chunks)", "stream20_c1", "ttft_p50_ms", 0.8)
    ratio(
        "unary throughput >= 60% of the bare grpc.aio floor (c=32)",
        g("unary_c32", "broker", "rps"),
        g("unary_c32", "grpc-null", "rps"),
        0.6,
        pct=True,
    )
    for peer, times in (("litellm", 10.0), ("portkey", 3.0)):
        for w, what in (
            ("unary_c32", "unary"),
            ("stream20_c32", "streaming, 20 chunks"),
            ("stream200_c32", "streaming, 200 chunks"),
        ):
            ratio(
                f"{what} throughput >= {times:.0f}x {TITLES[peer]} (c=32)",
                g(w, "broker", "rps"),
                g(w, peer, "rps"),
                times,
            )
    rss, errs, most = (g("hold1000", "broker", k) for k in ("server_rss_mb_peak", "errors", "max_open"))
    res.append(
        (
            "1,000 open streams: daemon RSS <= 150 MB",
            f"{_fmt(rss)} MB",
            rss <= 150 if rss is not None else None,
        )
    )
    res.append(
        (
            "1,000 open streams: 0 errors, all 1,000 open at once",
            f"{_fmt(errs)} errors, {_fmt(most)} open",
            errs == 0 and most == 1000 if errs is not None and most is not None else None,
        )
    )
    rss, errs, most = (g("hold10000", "broker", k) for k in ("server_rss_mb_peak", "errors", "max_open"))
    res.append(
        (
            "10,000 open streams held: 0 errors, all open at once (RSS reported)",
            f"{_fmt(errs)} errors, {_fmt(most)} open, {_fmt(rss)} MB",
            errs == 0 and most == 10_000 if errs is not None and most is not None else None,
        )
    )
    for w, what in (("workers_unary_c32", "unary"), ("workers_stream20_c32", "streaming")):
        ratio(
            f"`--workers 2` >= 1.7x one worker ({what}, c=32)",
            g(w, "broker-w2", "rps"),
            g(w, "broker", "rps"),
            1.7,
        )
    c = g("stream200_c32", "broker", "chunks_per_server_cpu_s")
    res.append(
        (
            "relayed chunks per second per core >= 20,000 (per daemon CPU-second)",
            _fmt(c),
            c >= 20_000 if c is not None else None,
        )
    )
    return res


def progress_line(workload: str, way: str, r: dict[str, Any]) -> str:
    bits = [f"{workload:20} {way:9}", f"ok={r.get('ok', 0)}", f"err={r.get('errors', 0)}"]
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
                ("reason20_c1", "ttft_p50_ms", "reason p50"),
            ],
            True,
        ),
        (
            "stream throughput, c=32 (streams/s, log)",
            [
                ("stream20_c32", "rps", "20 chunks"),
                ("stream200_c32", "rps", "200 chunks"),
                ("reason20_c32", "rps", "reason 20+20"),
            ],
            True,
        ),
        (
            "open streams: server RSS peak (MB, log)",
            [("hold1000", "server_rss_mb_peak", "1,000"), ("hold10000", "server_rss_mb_peak", "10,000")],
            True,
        ),
        (
            "1 worker vs --workers 2, c=32 (per s)",
            [("workers_unary_c32", "rps", "unary"), ("workers_stream20_c32", "rps", "stream 20")],
            False,
        ),
    ]
    ways = [w for w in WAYS if _present(out, w)]
    colors = {
        "direct": "#999999",
        "broker": "#1f77b4",
        "broker-w2": "#17becf",
        "litellm": "#d62728",
        "portkey": "#ff7f0e",
        "grpc-null": "#2ca02c",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (title, series, log) in zip(axes, panels, strict=True):
        width = 0.8 / len(ways)
        drawn = False
        for i, way in enumerate(ways):
            ys = [(_get(out, w, way, k) or 0.0) for w, k, _ in series]
            xs = [j + i * width for j in range(len(series))]
            ax.bar(xs, ys, width, label=TITLES[way], color=colors[way])
            drawn = drawn or any(y > 0 for y in ys)
        ax.set_xticks([j + width * (len(ways) - 1) / 2 for j in range(len(series))], [s[2] for s in series])
        ax.set_title(title, fontsize=9)
        if log and drawn:  # a panel whose workloads were not run stays linear (and empty)
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    m = out["machine"]
    quick = " (QUICK RUN: not measurements)" if out.get("quick") else ""
    fig.suptitle(f"model-broker bench: {m['cores']} cores, {m['cpu_model']}{quick}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
