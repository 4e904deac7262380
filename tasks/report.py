"""``ssn-bench compare``: the report of a set of runs from their ``summary.json``
(:mod:`tasks.summary`): runs grouped so that a group differs only by its seed, mean ± std tables
(Markdown, CSV), plots (metric against batch size, the SSN selection per layer), optionally logged
to wandb.

    ssn-bench compare outputs/sweeps/small-batch --out outputs/sweeps/small-batch/report \\
        [--metric test/acc1] [--filter norm=bn,ssn] [--group-by task norm batch_size] [--workspace]

Reading (:func:`load_records`), grouping (:func:`group_keys`, :func:`aggregate`), writing
(:func:`markdown_table`, :func:`write_csv`, the plots) and the whole report (:func:`compare`);
``--workspace``: the same comparison as a wandb workspace (:mod:`tasks.workspace`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssn import NORM_ORDER, STATS, selected_stat  # NORM_ORDER: how rows and lines are listed

from .summary import MEASURED, SUMMARY_FILE, malformed

__all__ = [
    "aggregate",
    "compare",
    "compare_main",
    "filter_records",
    "group_keys",
    "load_records",
    "markdown_table",
    "write_csv",
]


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config, ``init_args`` levels dropped (``model.lr``, ``data.batch_size``);
    a list of objects is indexed (``trainer.callbacks.0.dirpath``), other lists are values."""
    if isinstance(cfg, list) and cfg and all(isinstance(v, dict) for v in cfg):
        cfg = {str(i): v for i, v in enumerate(cfg)}
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = prefix if k == "init_args" else f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, (dict, list)) else {key: v})
    return out


def selection_fractions(selection: list[dict[str, Any]]) -> dict[str, float] | None:
    """Fraction of the layers' mean and variance choices latched to IN, LN and BN (each layer counts
    twice: its mean and its variance); None for a run without SN/SSN layers."""
    if not selection:
        return None
    choices = [r[f"{k}_latch"] for r in selection for k in ("mean", "var")]
    return {s: sum(c == s for c in choices) / len(choices) for s in STATS}


# Settings that never tell two experiments apart: where outputs go, how progress is shown, what a
# resumed run resumes from (the same run), the logger (it only records). The seed is the other one.
OUTPUT_KEYS = frozenset(
    {"trainer.default_root_dir", "ckpt_path", "trainer.enable_progress_bar", "trainer.enable_model_summary"}
)
OUTPUT_LEAVES = frozenset({"dirpath", "filename", "save_dir", "log_dir"})


def is_seed(key: str) -> bool:
    """``seed_everything``, the summary's ``seed`` and any ``*.seed`` (e.g. a data split's)."""
    return key.rsplit(".", 1)[-1] in ("seed", "seed_everything")


def _names_outputs(key: str) -> bool:
    return (
        key in OUTPUT_KEYS
        or key.startswith("trainer.logger.")
        or key == "trainer.logger"
        or key.rsplit(".", 1)[-1] in OUTPUT_LEAVES
    )


def _record(f: Path, s: dict[str, Any]) -> dict[str, Any]:
    config = s.get("config")
    if config is None:  # not from the CLI: the module's hyperparameters stand for its config
        config = {"model": {k: v for k, v in (s.get("hparams") or {}).items() if not k.startswith("_")}}
    flat = _flatten(config)
    rec: dict[str, Any] = dict(flat)
    rec.update({k: v for k, v in s.items() if not isinstance(v, (dict, list))})
    rec.update(s.get("metrics") or {})
    info = s.get("run_info")
    top = info if isinstance(info, dict) else {k: v for k, v in s.items() if k not in MEASURED}
    rec["_identity"] = [
        k
        for k in (*top, *flat)
        if k in rec and not isinstance(rec[k], dict) and not is_seed(k) and not _names_outputs(k)
    ]
    rec["_metrics"] = list(s.get("metrics") or {})
    rec["run"] = f.parent.name
    rec["path"] = str(f.parent)
    rec["selection"] = s.get("selection") or []
    fr = selection_fractions(rec["selection"])
    for st in STATS:
        rec[f"latched_{st}"] = fr[st] if fr else None
    return rec


def _grid_missing(folder: Path) -> list[tuple[str, str]]:
    """The runs a sweep folder's ``grid.json`` lists that have no summary yet."""
    try:
        grid = json.loads((folder / "grid.json").read_text())
        names = [str(g["name"]) for g in grid]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    return [
        (str(folder / n), "no summary.json (not run, running, or killed before fit ended)")
        for n in names
        if not (folder / n / SUMMARY_FILE).exists()
    ]


def load_records(
    paths: Sequence[str | Path],
    *,
    skipped: list[tuple[str, str]] | None = None,
    include_incomplete: bool = False,
) -> list[dict[str, Any]]:
    """One flat record per run: the summary's scalars, its metrics (``test/acc1``,
    ``best/val/acc1``...), its config flattened (``model.lr``...) and ``run`` (its folder).

    A summary that cannot be read or is malformed, a run that is not ``complete`` (unless
    ``include_incomplete``) and a sweep's run without a summary are left out and appended to
    ``skipped`` as (path, reason): one bad run never hides the others."""
    skipped = [] if skipped is None else skipped
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob(SUMMARY_FILE))
            skipped += _grid_missing(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such run folder or summary file")
    records = []
    for f in files:
        try:
            s = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skipped.append((str(f), f"unreadable: {type(e).__name__}: {e}"))
            continue
        problem = malformed(s)
        if problem:
            skipped.append((str(f), f"malformed: {problem}"))
        elif s.get("status") != "complete" and not include_incomplete:
            skipped.append(
                (str(f), f"incomplete (status {s.get('status')!r}): fit or its test did not finish")
            )
        else:
            records.append(_record(f, s))
    return records


def _match(value: Any, wanted: str) -> bool:
    for w in wanted.split(","):
        if str(value) == w or (str(value).lower() in ("true", "false") and str(value).lower() == w.lower()):
            return True
        try:
            if value is not None and float(value) == float(w):
                return True
        except (TypeError, ValueError):
            pass
    return False


def check_keys(
    records: list[dict[str, Any]], keys: Sequence[str], what: str, *, metrics: bool = False
) -> None:
    """A ``KeyError``-like ``ValueError`` naming the valid keys when no run has one of ``keys``
    (a typo would otherwise give an empty column or one merged row, silently)."""
    import difflib

    valid = sorted({k for r in records for k in (r["_metrics"] if metrics else r) if not k.startswith("_")})
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{what} {key!r}: no run has it{hint} Valid: {', '.join(valid)}")


def filter_records(records: list[dict[str, Any]], filters: Sequence[str]) -> list[dict[str, Any]]:
    """Keep records matching every ``KEY=V1,V2`` (any of the values); ``KEY!=V`` excludes."""
    out = records
    for f in filters:
        neg = "!=" in f
        key, _, wanted = f.partition("!=" if neg else "=")
        if not _:
            raise ValueError(f"--filter expects KEY=VALUE or KEY!=VALUE, got {f!r}")
        check_keys(records, [key], "--filter")
        out = [r for r in out if _match(r.get(key), wanted) != neg]
    return out


def _canon(value: Any) -> str:
    """A hashable, exact form of a config value (lists and objects included)."""
    return json.dumps(value, sort_keys=True, default=str)


# device_batch_size: the batch each (virtual) device's batch statistics come from, the paper's axis
DEFAULT_GROUP = ("task", "dataset", "arch", "norm", "device_batch_size", "batch_size", "global_batch_size")
BATCH_KEYS = ("device_batch_size", "batch_size", "global_batch_size", "virtual_devices")
# The report's figures (``<name>.png``), in the order report.md shows them and wandb logs them.
FIGURES = ("metric_vs_batch", "selection_vs_batch", "selection")


def device_batch(r: dict[str, Any]) -> Any:
    """The per-device batch of a run or row: ``device_batch_size`` (summaries since virtual
    devices), else ``batch_size`` (one device per process)."""
    value = r.get("device_batch_size")
    return r.get("batch_size") if value is None else value


def group_keys(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The keys that make each group differ only by seed: every identity value (summary identity
    and resolved config, less the seed and output-only settings) that differs between the runs.

    Returns (the keys shown: the usual columns any run has, then each differing key that splits
    the runs further; the differing keys that split nothing more, e.g. ``model.norm`` beside
    ``norm``). Grouping by the first gives the same groups as grouping by all of them."""
    identity = {k for r in records for k in r["_identity"]}
    order = [k for k in DEFAULT_GROUP if k in identity]
    order += sorted(identity - set(order), key=lambda k: ("." in k, k))  # summary fields, then config
    differing = [k for k in order if len({_canon(r.get(k)) for r in records}) > 1]
    shown = [k for k in DEFAULT_GROUP if any(k in r for r in records)]
    n_groups = len({tuple(_canon(r.get(k)) for k in shown) for r in records})
    implied = []
    for k in differing:
        if k in shown:
            continue
        n = len({tuple(_canon(r.get(x)) for x in (*shown, k)) for r in records})
        if n > n_groups:
            shown.append(k)
            n_groups = n
        else:
            implied.append(k)
    return shown, implied


def pooled_keys(records: list[dict[str, Any]], group_by: Sequence[str]) -> list[str]:
    """Identity keys that differ inside some group of ``group_by`` (other than the seed): an
    explicit ``--group-by`` that averages different experiments says so."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_canon(r.get(k)) for k in group_by), []).append(r)
    keys = sorted({k for r in records for k in r["_identity"]} - set(group_by))
    return [k for k in keys if any(len({_canon(r.get(k)) for r in g}) > 1 for g in groups.values())]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, str) and value in NORM_ORDER:
        return (0, NORM_ORDER.index(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def aggregate(
    records: list[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per distinct ``group_by`` values: mean and sample std (over the runs, i.e. the seeds)
    of each metric, mean throughput, peak memory (max), mean fraction of choices latched to each
    statistic, and the seeds and runs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(_canon(r.get(k)) for k in group_by), []).append(r)
    rows = []
    for rs in sorted(groups.values(), key=lambda g: tuple(_sort_key(g[0].get(k)) for k in group_by)):
        row: dict[str, Any] = {k: rs[0].get(k) for k in group_by}
        row["n"] = len(rs)
        row["seeds"] = sorted({r.get("seed") for r in rs}, key=_sort_key)
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            row[f"{m} mean"], row[f"{m} std"] = _mean_std(vals)
            row[f"{m} n"] = len(vals)
        thr = [r["throughput"] for r in rs if r.get("throughput")]
        row["throughput"] = statistics.fmean(thr) if thr else None
        mem = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb")]
        row["peak_memory_mb"] = max(mem) if mem else None
        kinds = {str(r.get("peak_memory_kind")) for r in rs if r.get("peak_memory_mb")}
        row["peak_memory_kind"] = ",".join(sorted(kinds))
        for st in STATS:
            vals = [r[f"latched_{st}"] for r in rs if r.get(f"latched_{st}") is not None]
            row[f"latched_{st}"] = statistics.fmean(vals) if vals else None
        if "virtual_devices" not in row:  # the plots' axis label says how the per-device batch came about
            devices = {r.get("virtual_devices") for r in rs}
            row["virtual_devices"] = devices.pop() if len(devices) == 1 else None
        row["runs"] = [r["run"] for r in rs]
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def markdown_table(rows: list[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str]) -> str:
    head = [
        *group_by,
        "seeds",
        *[f"{m} (mean ± std)" for m in metrics],
        "samples/s",
        "peak MiB",
        "latched IN / LN / BN",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < len(group_by) + 1 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        cells = [_fmt(r[k]) for k in group_by] + [_fmt(r["seeds"])]
        for m in metrics:
            mean, std = r[f"{m} mean"], r[f"{m} std"]
            cells.append(
                "—" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"
            )
        cells.append(_fmt(r["throughput"], 0))
        cells.append(_fmt(r["peak_memory_mb"], 0))
        fr = [r[f"latched_{s}"] for s in STATS]
        cells.append("—" if fr[0] is None else " / ".join(f"{x:.2f}" for x in fr))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    from ssn.io import atomic_write

    def write(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(
                [
                    ""
                    if r.get(c) is None
                    else ";".join(map(str, r[c]))
                    if isinstance(r.get(c), list)
                    else r[c]
                    for c in columns
                ]
            )

    atomic_write(path, write, binary=False)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_ssn(r: dict[str, Any]) -> bool:
    return "ssn" in str(r.get("norm", "")).lower()


def _panel_of(r: dict[str, Any], panels: Sequence[str]) -> tuple[str, ...]:
    """A plot panel's label parts: each ``panels`` value (``key=value`` for config keys)."""
    return tuple(
        f"{k}={_fmt(r.get(k))}" if "." in k or k.startswith("pretrained") else _fmt(r.get(k)) for k in panels
    )


def _batch_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.set_xscale("log", base=2)
    xs = sorted({device_batch(r) for r in rows})
    ax.set_xticks(xs, [str(x) for x in xs])
    devices = sorted({r.get("virtual_devices") or 1 for r in rows})
    ax.set_xlabel(
        "per-device batch size"
        + (f" ({devices[0]} virtual devices)" if devices != [1] and len(devices) == 1 else "")
    )


def plot_metric_vs_batch(
    rows: list[dict[str, Any]],
    metric: str,
    path: Path,
    title: str = "",
    panels: Sequence[str] = ("task", "dataset", "arch"),
) -> bool:
    """Metric (mean ± std over seeds) against the per-device batch (log scale), one line per
    normalizer, one panel per value of the ``panels`` keys (the other group keys: one experiment
    per line). False when no row has a batch size."""
    rows = [r for r in rows if device_batch(r) is not None and r.get(f"{metric} mean") is not None]
    if not rows:
        return False
    plt = _plt()

    names = sorted({_panel_of(r, panels) for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, panel in zip(axes[0], names, strict=True):
        sub = [r for r in rows if _panel_of(r, panels) == panel]
        for norm in sorted({r.get("norm") for r in sub}, key=_sort_key):
            line = sorted((r for r in sub if r.get("norm") == norm), key=device_batch)
            xs = [device_batch(r) for r in line]
            ys = [r[f"{metric} mean"] for r in line]
            es = [r[f"{metric} std"] or 0.0 for r in line]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=str(norm).upper())
        _batch_axis(ax, sub)
        ax.set_ylabel(metric)
        label = " / ".join(p for p in panel if p != "—")
        ax.set_title(label if len(names) > 1 else title or label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_selection(records: list[dict[str, Any]], path: Path) -> bool:
    """Which statistic each layer of each SSN run chose, by depth (rows: layers in network order;
    columns: runs by batch size and seed; left the mean, right the variance). A faded cell is not
    latched (its current argmax). False when no run has SSN layers."""
    runs = [r for r in records if r["selection"] and _is_ssn(r)]
    if not runs:
        return False
    runs.sort(key=lambda r: (_sort_key(r.get("task")), _sort_key(device_batch(r)), _sort_key(r.get("seed"))))
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ["#4c72b0", "#dd8452", "#55a868"]  # IN, LN, BN
    layers = [row["layer"] for row in runs[0]["selection"]]
    n = max(len(r["selection"]) for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.45 * len(runs) * 2, 1.2 + 0.32 * n), sharey=True)
    for ax, kind in zip(axes, ("mean", "var"), strict=True):
        grid = [[math.nan] * len(runs) for _ in range(n)]
        for j, r in enumerate(runs):
            for i, row in enumerate(r["selection"]):
                values = [row[f"{kind}_{s}"] for s in STATS]
                choice = selected_stat(row[f"{kind}_latch"], values)
                grid[i][j] = choice
                if not row[f"{kind}_latch"]:
                    ax.text(j, i, "?", ha="center", va="center", fontsize=7, color="white")
        ax.imshow(grid, cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5, aspect="auto")
        labels = [f"b{device_batch(r)} s{r.get('seed')}" for r in runs]
        if len({r.get("task") for r in runs}) > 1:
            labels = [f"{r.get('arch')} {lab}" for r, lab in zip(runs, labels, strict=True)]
        ax.set_xticks(range(len(runs)), labels, rotation=90, fontsize=7)
        ax.set_title(kind)
    axes[0].set_yticks(range(len(layers)), layers, fontsize=7)
    axes[0].set_ylabel("layer (input -> output)")
    fig.legend(
        handles=[Patch(color=c, label=s.upper()) for c, s in zip(colours, STATS, strict=True)],
        loc="lower center",
        ncol=3,
        fontsize=7,
    )
    fig.suptitle("SSN selection per layer (? = not latched: argmax)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_selection_vs_batch(
    rows: list[dict[str, Any]], path: Path, title: str = "", panels: Sequence[str] = ()
) -> bool:
    """The share of SSN's choices (layers' means and variances) latched to IN, LN and BN against
    the per-device batch (mean over seeds), one panel per value of the ``panels`` keys. False
    when fewer than two SSN rows have a latched share."""
    rows = [r for r in rows if _is_ssn(r) and device_batch(r) is not None and r.get("latched_bn") is not None]
    if len(rows) < 2:
        return False
    plt = _plt()
    names = sorted({_panel_of(r, panels) for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    colours = {"in": "#4c72b0", "ln": "#dd8452", "bn": "#55a868"}
    for ax, panel in zip(axes[0], names, strict=True):
        sub = [r for r in rows if _panel_of(r, panels) == panel]
        norms = sorted({r.get("norm") for r in sub}, key=_sort_key)
        for norm in norms:
            line = sorted((r for r in sub if r.get("norm") == norm), key=device_batch)
            xs = [device_batch(r) for r in line]
            for st in STATS:
                label = st.upper() + (f" ({norm})" if len(norms) > 1 else "")
                ax.plot(xs, [r[f"latched_{st}"] for r in line], marker="o", color=colours[st], label=label)
        _batch_axis(ax, sub)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("share of choices latched to")
        label = " / ".join(p for p in panel if p != "—")
        ax.set_title(label or title or "SSN selection against per-device batch", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def selection_summary(records: list[dict[str, Any]], group_by: Sequence[str]) -> str:
    """Per group of SSN runs: the counts of each statistic over the layers (mean; var) and the
    per-layer choices of each run."""
    lines = []
    runs = [r for r in records if r["selection"] and _is_ssn(r)]
    runs.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in (*group_by, "seed")))
    for r in runs:
        sel = r["selection"]
        pick = {
            k: [
                row[f"{k}_latch"] or f"({STATS[selected_stat(None, [row[f'{k}_{st}'] for st in STATS])]})"
                for row in sel
            ]
            for k in ("mean", "var")
        }
        counts = {k: ", ".join(f"{s.upper()} {sum(c == s for c in pick[k])}" for s in STATS) for k in pick}
        ident = " ".join(f"{k}={_fmt(r.get(k))}" for k in (*group_by, "seed") if r.get(k) is not None)
        lines.append(
            f"- {ident}: mean {counts['mean']}; var {counts['var']} — per layer (mean/var): "
            + " ".join(f"{m.upper()}/{v.upper()}" for m, v in zip(pick["mean"], pick["var"], strict=True))
        )
    return "\n".join(lines)


def default_out(paths: Sequence[str | Path]) -> Path:
    """``report/`` beside the first run argument: inside it for a folder, beside it for a file."""
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def compare(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    metrics: Sequence[str] = ("test/acc1",),
    group_by: Sequence[str] | None = None,
    filters: Sequence[str] = (),
    plots: bool = True,
    title: str = "",
    include_incomplete: bool = False,
) -> dict[str, Any]:
    """Read the runs' summaries under ``paths``, write ``report.md``, ``report.csv`` (one row per
    group), ``runs.csv`` (one row per run) and the plots into ``out`` (default
    :func:`default_out`); return the rows, files and the runs left out.

    ``group_by`` None: groups of runs that differ only by their seed (:func:`group_keys`). Runs
    whose summary is unreadable, malformed or not ``complete`` are left out and named in the
    report (:func:`load_records`)."""
    from ssn.io import write_text_atomic

    skipped: list[tuple[str, str]] = []
    loaded = load_records(paths, skipped=skipped, include_incomplete=include_incomplete)
    left_out = "".join(f"\n  {path}: {why}" for path, why in skipped)
    if not loaded:
        raise ValueError(
            f"no usable run summary ({SUMMARY_FILE}) under {', '.join(map(str, paths))}"
            + (f"; left out:{left_out}" if left_out else "")
        )
    check_keys(loaded, metrics, "--metric", metrics=True)
    if group_by is not None:
        check_keys(loaded, group_by, "--group-by")
    records = filter_records(loaded, filters)
    if not records:
        raise ValueError(f"no run under {', '.join(map(str, paths))} matches {' '.join(filters)}")
    implied: list[str] = []
    if group_by is None:
        group_by, implied = group_keys(records)
        grouping = (
            f"Groups: runs that differ only by their seed, told apart by {', '.join(group_by) or 'nothing'}"
            + (f" (also differing, implied by those: {', '.join(implied)})" if implied else "")
            + "."
        )
    else:
        pooled = pooled_keys(records, group_by)
        grouping = (
            f"Groups: by {', '.join(group_by)} (--group-by)"
            + (
                f"; WARNING: runs of a group also differ in {', '.join(pooled)}, averaged as if seeds"
                if pooled
                else "; the runs of a group differ only by their seed"
            )
            + "."
        )
    out = Path(out) if out is not None else default_out(paths)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records, group_by, metrics)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "runs": out / "runs.csv"}
    cols = [*group_by, "n", "seeds"]
    for m in metrics:
        cols += [f"{m} mean", f"{m} std", f"{m} n"]
    cols += ["throughput", "peak_memory_mb", "peak_memory_kind", *(f"latched_{s}" for s in STATS), "runs"]
    write_csv(files["csv"], rows, cols)
    run_cols = [
        "run",
        *[k for k in group_by if k not in ("run",)],
        "seed",
        "status",
        "global_step",
        *metrics,
        "throughput",
        "peak_memory_mb",
        *(f"latched_{s}" for s in STATS),
        "path",
    ]
    write_csv(
        files["runs"],
        sorted(records, key=lambda r: tuple(_sort_key(r.get(k)) for k in (*group_by, "seed"))),
        run_cols,
    )
    if plots:
        panels = [k for k in group_by if k not in ("norm", *BATCH_KEYS)]
        if plot_metric_vs_batch(rows, metrics[0], out / "metric_vs_batch.png", title, panels=panels):
            files["metric_vs_batch"] = out / "metric_vs_batch.png"
        if plot_selection_vs_batch(rows, out / "selection_vs_batch.png", title, panels=panels):
            files["selection_vs_batch"] = out / "selection_vs_batch.png"
        if plot_selection(records, out / "selection.png"):
            files["selection"] = out / "selection.png"
    kinds = sorted({str(r.get("peak_memory_kind")) for r in records if r.get("peak_memory_kind")})
    md = [
        f"# {title or 'Comparison'}",
        "",
        f"{len(records)} runs in {len(rows)} groups; mean ± sample std over the runs of a group (the seeds); "
        "samples/s: training throughput over all devices (training batches only); "
        f"peak MiB: {', '.join(kinds)} "
        "(max over the group); latched IN / LN / BN: fraction of the layers' mean and variance choices "
        "latched to each statistic.",
        "",
        grouping,
        "",
    ]
    if skipped:
        md += [
            f"Left out: {len(skipped)} runs (not in the table).",
            "",
            *(f"- {path}: {why}" for path, why in skipped),
            "",
        ]
    md += [markdown_table(rows, group_by, metrics), ""]
    sel = selection_summary(
        records, [k for k in group_by if k in ("task", "arch", "device_batch_size", "batch_size")]
    )
    if sel:
        md += [
            "## SSN selection per run (layers from input to output; (x): not latched, argmax)",
            "",
            sel,
            "",
        ]
    for key in FIGURES:
        if key in files:
            md += [f"![{key}]({files[key].name})", ""]
    write_text_atomic(files["markdown"], "\n".join(md))
    return {
        "rows": rows,
        "records": records,
        "files": files,
        "markdown": "\n".join(md),
        "group_by": list(group_by),
        "implied": implied,
        "grouping": grouping,
        "skipped": skipped,
    }


def log_to_wandb(
    result: dict[str, Any], *, project: str, mode: str, name: str | None, entity: str | None = None
) -> dict[str, Any]:
    """The report as a wandb table and images (``mode``: ``online`` or ``offline``), in a run of
    job type ``compare``; returns its entity, project and name (a workspace keeps it in view)."""
    import wandb

    rows = result["rows"]
    cols = [k for k in rows[0] if k != "runs"]
    run = wandb.init(project=project, entity=entity, job_type="compare", name=name, mode=mode)
    logged = {"entity": run.entity, "project": run.project, "name": run.name}
    data = [[json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in cols] for r in rows]
    payload: dict[str, Any] = {"compare/table": wandb.Table(columns=cols, data=data)}
    for key in FIGURES:
        if key in result["files"]:
            payload[f"compare/{key}"] = wandb.Image(str(result["files"][key]))
    run.log(payload)
    run.finish()
    return logged


def compare_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ssn-bench compare", description="Compare runs from their summary.json.")
    p.add_argument("runs", nargs="+", help="run folders, sweep folders (searched) or summary files")
    p.add_argument("--out", default=None, help="report folder (default: <first RUNS>/report)")
    p.add_argument(
        "--metric", nargs="+", default=["test/acc1"], help="metrics to tabulate (the first is plotted)"
    )
    p.add_argument(
        "--group-by",
        nargs="+",
        default=None,
        help="fields (any summary field or config key: model.lr); default: every identity and config "
        "value that differs between the runs except the seed and output paths",
    )
    p.add_argument(
        "--include-incomplete",
        action="store_true",
        help="also tabulate runs whose summary is not `complete` (fitted, not tested)",
    )
    p.add_argument(
        "--filter", action="append", default=[], metavar="KEY=V1,V2", help="keep matching runs (KEY!=V drops)"
    )
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--wandb", choices=["off", "offline", "online"], default="off", help="also log the report to wandb"
    )
    p.add_argument("--wandb-project", default="ssn-bench")
    p.add_argument("--wandb-entity", default=None, help="wandb entity (default: your default entity)")
    p.add_argument(
        "--workspace",
        action="store_true",
        help="also build the comparison as a wandb workspace (tasks.workspace): its definition is "
        "written to the report folder (workspace.json); saved to wandb with --wandb online only",
    )
    ns = p.parse_args(list(argv))
    try:
        result = compare(
            ns.runs,
            ns.out,
            metrics=ns.metric,
            group_by=ns.group_by,
            filters=ns.filter,
            plots=not ns.no_plots,
            title=ns.title,
            include_incomplete=ns.include_incomplete,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(result["grouping"] + "\n")
    for path, why in result["skipped"]:
        print(f"left out: {path}: {why}")
    print(markdown_table(result["rows"], result["group_by"], ns.metric))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result["files"].items()))
    logged: dict[str, Any] = {}
    if ns.wandb != "off":
        # NOTE: a workspace finds the report's run by its name: give it one
        name = ns.title or (f"compare {result['files']['markdown'].parent.name}" if ns.workspace else None)
        logged = log_to_wandb(
            result, project=ns.wandb_project, mode=ns.wandb, name=name, entity=ns.wandb_entity
        )
    if ns.workspace:
        from .workspace import build_workspace, save_workspace, write_workspace

        workspace, grouping = build_workspace(
            result,
            ns.metric[0],
            project=ns.wandb_project,
            entity=ns.wandb_entity or logged.get("entity") or "",
            title=ns.title,
            compare_run=logged.get("name"),
        )
        path = write_workspace(workspace, grouping, result["files"]["markdown"].parent)
        print(f"workspace: {path}")
        if ns.wandb == "online":
            print(f"workspace saved: {save_workspace(workspace)}")
        else:  # offline: nothing is sent
            entity = f" --entity {ns.wandb_entity}" if ns.wandb_entity else ""
            print(
                f"workspace not saved (--wandb {ns.wandb}); save it online later with: "
                f"python -m tasks.workspace {path}{entity}"
                + (" (after `wandb sync` of the report's offline run)" if ns.wandb == "offline" else "")
            )
    return 0
