"""PNG plots of a benchmark run: time and peak memory against the vocabulary size, one line per provider.

One figure per (op, dtype, mode), two panels (median time, peak resident delta), both axes
logarithmic; with several ``--tokens`` values each provider gets a line per token count (same colour,
another line style). Drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_STYLES = ("-", "--", ":", "-.")


def plot_rows(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Write ``<op>-<dtype>-<mode>.png`` under ``out_dir`` for the rows with status ``ok``; returns the
    paths. Needs matplotlib (the ``bench`` extra): without it, prints why and writes nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plots: matplotlib cannot be imported ({exc}); pip install matplotlib")
        return []
    ok = [r for r in rows if r.get("status") == "ok"]
    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for op, dtype, mode in dict.fromkeys((r["op"], r["dtype"], r["mode"]) for r in ok):
        group = [r for r in ok if (r["op"], r["dtype"], r["mode"]) == (op, dtype, mode)]
        providers = list(dict.fromkeys(r["provider"] for r in group))
        token_counts = sorted({r["tokens"] for r in group})
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
        for i, provider in enumerate(providers):
            for j, tokens in enumerate(token_counts):
                line = sorted((r for r in group if (r["provider"], r["tokens"]) == (provider, tokens)),
                              key=lambda r: r["vocab"])  # fmt: skip
                if not line:
                    continue
                label = provider if len(token_counts) == 1 else f"{provider}, {tokens} tokens"
                style = {"color": f"C{i}", "linestyle": _STYLES[j % len(_STYLES)], "marker": "o", "label": label}
                vocab = [r["vocab"] for r in line]
                ax_time.plot(vocab, [r["median_ms"] for r in line], **style)
                # a log axis: a zero delta (the peak stayed where it started) has no point
                mem = [(r["vocab"], r["peak_delta_bytes"] / 2**20) for r in line if r.get("peak_delta_bytes", 0) > 0]
                if mem:
                    ax_mem.plot(*zip(*mem, strict=True), **style)
        tokens_note = f"{token_counts[0]} tokens" if len(token_counts) == 1 else "tokens per line"
        vocabs = sorted({r["vocab"] for r in group})
        peak = "allocated" if group[0].get("device_type") == "cuda" else "resident"  # PeakCUDA or PeakRSS
        for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, f"peak {peak} delta (MiB)")):
            ax.set_xscale("log")
            ax.set_xticks(vocabs, [str(v) for v in vocabs], minor=False)
            ax.set_xticks([], minor=True)
            ax.set_yscale("log")
            ax.set_xlabel("vocabulary size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize="small")
        fig.suptitle(f"{op}, {dtype}, {mode} ({tokens_note}; {group[0]['device']})", fontsize="medium")
        path = out / f"{op}-{dtype}-{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
