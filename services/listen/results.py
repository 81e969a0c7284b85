"""What the listeners said, per concept and mode: the steered reply's win rate among decided
answers with its 95% Wilson interval, the "can't tell" share, as rows, CSV and a PNG plot."""

import csv
import io
from dataclasses import asdict, dataclass

from steering.binomial import wilson

COLUMNS = ("concept", "mode", "answers", "steered", "plain", "cant_tell", "decided", "win_rate", "wilson_low",
           "wilson_high", "cant_tell_share")


@dataclass(frozen=True)
class Row:
    concept: str
    mode: str
    answers: int
    steered: int
    plain: int
    cant_tell: int
    decided: int
    win_rate: float | None
    wilson_low: float | None
    wilson_high: float | None
    cant_tell_share: float | None


def summarise(counts: list[tuple[str, str, str, int]]) -> list[Row]:
    """Rows per (concept, mode) from (concept, mode, verdict, count) tuples, sorted."""
    tally: dict[tuple[str, str], dict[str, int]] = {}
    for concept, mode, verdict, n in counts:
        tally.setdefault((concept, mode), {"steered": 0, "plain": 0, "cant_tell": 0})[verdict] += n
    rows = []
    for (concept, mode), t in sorted(tally.items()):
        decided = t["steered"] + t["plain"]
        total = decided + t["cant_tell"]
        interval = wilson(t["steered"], decided) if decided else None
        rows.append(Row(concept, mode, total, t["steered"], t["plain"], t["cant_tell"], decided,
                        t["steered"] / decided if decided else None,
                        interval[0] if interval else None, interval[1] if interval else None,
                        t["cant_tell"] / total if total else None))
    return rows


def as_json(rows: list[Row]) -> dict:
    return {"columns": list(COLUMNS), "groups": [asdict(r) for r in rows], "answers": sum(r.answers for r in rows)}


def as_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in asdict(r).values()])
    return out.getvalue()


def plot_png(rows: list[Row]) -> bytes:
    """Win rate with its interval per concept and mode, 0.5 (chance) marked; PNG bytes."""
    # Figure with the Agg canvas directly, not pyplot: no global figure state shared across requests.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in rows if r.win_rate is not None]
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(shown)), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (can't tell apart)")
    for x, r in enumerate(shown):
        assert r.win_rate is not None and r.wilson_low is not None and r.wilson_high is not None
        ax.errorbar([x], [r.win_rate], yerr=[[r.win_rate - r.wilson_low], [r.wilson_high - r.win_rate]], fmt="o",
                    capsize=4, color="tab:blue")
    ax.set_xticks(range(len(shown)), [f"{r.concept}\n{r.mode}\nn={r.decided}" for r in shown], fontsize=8)
    ax.set_xlim(-0.7, max(len(shown), 1) - 0.3)
    ax.set_ylim(0, 1)
    ax.set_ylabel("steered reply chosen (decided answers)")
    ax.set_title("Listening test: win rate, 95% Wilson interval", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
