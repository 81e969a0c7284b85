"""The human side of a validation record: a markdown report and PNG plots beside it."""

import json
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, write_text_atomic
from .config import SteerConfig
from .pairs import Concept
from .record import DEGENERATE_EXCESS_MAX, GATE_D, PPL_RATIO_MAX, Effect, entry_config, record_replies
from .vector import ConceptVector

REPORT_NAME = "validation.md"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def effect_text(entry: dict[str, Any], alpha: float | None, replies: int = 0) -> str:
    """d at one swept alpha with its 95% interval and sample sizes, e.g. `0.84 [0.55, 1.13] n 96/96`."""
    point = next((p for p in entry["sweep"] if p["alpha"] == alpha), None) if alpha is not None else None
    if point is None:
        return "-"
    e = Effect.of(point, replies)
    return f"{e.d:.2f} [{e.low:.2f}, {e.high:.2f}] n {e.n}/{e.n_control}"


def served_summary(entry: dict[str, Any], replies: int = 0) -> str:
    """One line for a terminal: what each profile serves and the d it buys there."""
    blip = min(entry["max_alpha"] or 0, entry["child_safe_alpha"] or 0) or None
    return (f"personal: alpha {_fmt(entry['recommended_alpha'])} d {effect_text(entry, entry['recommended_alpha'], replies)}, "
            f"max {_fmt(entry['max_alpha'])}; Blip: alpha {_fmt(entry.get('child_recommended_alpha'))} "
            f"d {effect_text(entry, entry.get('child_recommended_alpha'), replies)}, ceiling {_fmt(blip)}; "
            f"largest d at any alpha {entry['largest_d']:.2f}" + (f"; Blip's Chat: {mode_text(entry['blip'])}" if "blip" in entry else ""))


def mode_text(chosen: dict[str, Any]) -> str:
    """The mode a Blip Chat reply is served in, e.g. `both at alpha 6.1, d 1.20 [0.89, 1.51] n 96`."""
    if chosen["mode"] is None:
        return "none (answered plainly)"
    at = "" if chosen["alpha"] is None else f" at alpha {chosen['alpha']:g}"
    return f"{chosen['mode']}{at}, d {chosen['d']:.2f} [{chosen['d_low']:.2f}, {chosen['d_high']:.2f}] n {chosen['n']}"


def _point_text(point: dict[str, Any], replies: int) -> str:
    return effect_text({"sweep": [point]}, point["alpha"], replies)


def _modes_section(record: dict[str, Any], replies: int) -> list[str]:
    measured = {name: c for name, c in sorted(record["concepts"].items()) if "modes" in c}
    if not measured:
        return []
    base = record.get("baseline_blip") or {}
    lines = [
        "",
        "## Blip's modes: steering, prompting, both",
        "",
        "The allowlist's concepts are measured as Blip speaks: every reply under Blip's system prompt, and d against "
        f"unsteered replies under it ({_pct(base.get('flags'))} flagged, {_pct(base.get('degenerate'))} looping, "
        f"{base.get('replies', '-')} replies). Steering alone is the sweep above. Prompt only adds the concept's one-sentence "
        "register instruction to the system prompt, unsteered; both adds it and steers. Each mode is judged by the same "
        "gate, coherence and child-safe rules; Blip's Chat serves the mode with the largest d among those that pass "
        "(`none`: the concept's tags are answered plainly).",
        "",
        "| concept | instruction | steer: Blip alpha, d [95%] | prompt only: d [95%] | ppl ratio | looping | flagged "
        "| both: alpha, d [95%], ppl ratio, flagged | served |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in measured.items():
        m, steer = c["modes"], c.get("child_recommended_alpha")
        p = m["prompt"]
        both = "; ".join(f"{b['alpha']:g}: {_point_text(b, replies)}, {b['ppl_ratio']:.2f}, {_pct(b.get('flags'))}" for b in m["both"])
        lines.append(f"| {name} | {m['instruction']} | {_fmt(steer)}: {effect_text(c, steer, replies)} | {_point_text(p, replies)} "
                     f"| {p['ppl_ratio']:.2f} | {p['degenerate']:.2f} | {_pct(p.get('flags'))} | {both} | {mode_text(c['blip'])} |")
    return lines


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Validation: {record['model']}",
        "",
        f"Fingerprint `{record['fingerprint'][:16]}`, steering layers {record['layers']}, "
        f"run {record['created']} in {record['duration_s']:.0f} s.",
        "",
        "## Model checks",
        "",
        "| check | passed | figure | threshold | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, c in record["checks"].items():
        lines.append(f"| {name} | {'yes' if c['passed'] else 'NO'} | {c['figure']:g} | {_fmt(c['threshold'])} | {c['detail']} |")
    s = record["settings"]
    lines += [
        "",
        "## Concepts",
        "",
        f"Effect size: Cohen's d (pooled SD) between steered and unsteered replies' concept scores, "
        f"{s['prompts']} evaluation prompts x {len(s['seeds'])} seeds ({len(s.get('allowlist_seeds', s['seeds']))} seeds for "
        f"the Blip allowlist's concepts), {s['max_new_tokens']} tokens, temperature {s['temperature']}, with its 95% "
        f"interval and the replies on each side. An alpha passes the gate when the whole interval is above {GATE_D}; "
        f"a concept that never passes but whose interval is wholly below -{GATE_D} at a coherent alpha is `inverted`. "
        f"Coherence holds while the median perplexity ratio (steered / unsteered, under the unsteered model) "
        f"is at most {PPL_RATIO_MAX:g} and looping replies exceed unsteered by at most {DEGENERATE_EXCESS_MAX:g}.",
        "",
        f"Child-safe alpha: the largest coherent swept alpha whose own steered replies raise no more content-guard "
        f"flags and no more looping replies than unsteered ones (unsteered: {_pct((record.get('baseline') or {}).get('flags'))} "
        f"flagged, {_pct((record.get('baseline') or {}).get('degenerate'))} looping). "
        "Each profile serves a concept only at an alpha where the gate, coherence and (in Blip) the child-safe bound "
        "all hold, and by default at the one with the best d among those: `-` means the profile does not serve it. "
        "The largest d at any swept alpha, past those bounds included, is only for reference.",
        "",
        "Configuration: the layers steered, how alpha is spread over them (`uniform`, or `norm`: in proportion to "
        "each layer's residual norm, alpha being the mean), the positions (`all`, or `generated` tokens only), and "
        "`+np` where each steered state is scaled back to its own norm. Alphas are the mean strength per layer.",
        "",
        "| concept | configuration | status | personal alpha | d there [95%] | max alpha | d at max | child-safe alpha "
        "| Blip alpha | d there [95%] | largest d at any alpha |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    replies = record_replies(record)
    default = SteerConfig(tuple(record["layers"]))
    for name, c in sorted(record["concepts"].items()):
        blip = c.get("child_recommended_alpha")
        config = (entry_config(c) or default).name
        lines.append(f"| {name} | {config} | {c['status']} | {_fmt(c['recommended_alpha'])} | {effect_text(c, c['recommended_alpha'], replies)} "
                     f"| {_fmt(c['max_alpha'])} | {effect_text(c, c['max_alpha'], replies)} | {_fmt(c.get('child_safe_alpha'))} "
                     f"| {_fmt(blip)} | {effect_text(c, blip, replies)} | {c['largest_d']:.2f} |")
    away = {name: c["negative"] for name, c in sorted(record["concepts"].items()) if "negative" in c}
    if away:
        lines += [
            "",
            "## Steering away (alpha < 0)",
            "",
            "Swept with `steer validate --negative`: the same alphas negated. The effect is how far the concept's score "
            f"falls (-d); an alpha passes when the whole interval of d is below -{GATE_D}, and the direction is `inverted` "
            "when the score rises instead. Only the personal profile serves a negative alpha, up to max alpha, and only "
            "where this passed; Blip never does.",
            "",
            "| concept | status | recommended alpha | d there [95%] | max alpha |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [f"| {name} | {n['status']} | {_fmt(n['recommended_alpha'])} | {effect_text(n, n['recommended_alpha'], replies)} "
                  f"| {_fmt(n['max_alpha'])} |" for name, n in away.items()]
    lines += _modes_section(record, replies)
    searched = {name: c["search"] for name, c in sorted(record["concepts"].items()) if c.get("search")}
    if searched:
        lines += [
            "",
            "## Configuration search",
            "",
            f"Each candidate is one point at {s.get('screen_alpha_rel', '-')} of its band's mean residual norm, on the "
            "first seeds' replies: the default band at a uniform alpha, each candidate band with alpha relative to each "
            "layer's norm, then the best of those norm-preserving and on generated tokens only. The chosen one (bold) is "
            "coherent, raised no more flags or loops than unsteered where any did, and has the largest d; its own sweep "
            "below, on all the replies, is what the gate decides on.",
            "",
            "| concept | configuration | alpha | d [95%] | ppl ratio | looping | flagged |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, points in searched.items():
            chosen = SteerConfig.from_dict(record["concepts"][name]["config"]).name
            for p in points:
                label = f"**{p['name']}**" if p["name"] == chosen else p["name"]
                lines.append(f"| {name} | {label} | {p['alpha']:g} | {effect_text({'sweep': [p]}, p['alpha'], replies)} "
                             f"| {p['ppl_ratio']:.2f} | {p['degenerate']:.2f} | {_pct(p.get('flags'))} |")
    lines += ["", "## Sweeps", ""]
    for name, c in sorted(record["concepts"].items()):
        lines += [f"### {name}", "", "| alpha | alpha/norm | d [95%] | ppl ratio | looping | flagged | flagged themes | example reply |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        examples = {**c.get("examples", {}), **c.get("negative", {}).get("examples", {})}
        rows = [(f"{p['alpha']:g}", p, examples.get(str(p["alpha"]), "")) for p in c["sweep"] + c.get("negative", {}).get("sweep", [])]
        if "modes" in c:
            m = c["modes"]
            rows.append(("prompt only", m["prompt"], m["examples"].get("prompt", "")))
            rows += [(f"both {p['alpha']:g}", p, m["examples"].get(f"both {p['alpha']}", "")) for p in m["both"]]
        for label, p, example in rows:
            example = example.replace("|", "/").replace("\n", " ")[:120]
            themes = ", ".join(f"{t} {n}" for t, n in p.get("flag_themes", {}).items()) or "-"
            lines.append(f"| {label} | {p['alpha_rel']:g} | {_point_text(p, replies)} | {p['ppl_ratio']:.2f} | {p['degenerate']:.2f} "
                         f"| {_pct(p.get('flags'))} | {themes} | {example} |")
        lines.append("")
    return "\n".join(lines)


def write_report(model_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(model_dir) / REPORT_NAME
    write_text_atomic(path, markdown(record) + "\n")
    return path


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(model_dir: Path, record: dict[str, Any], vectors: dict[str, ConceptVector], concepts: dict[str, Concept], layers: list[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(model_dir) / "plots"
    written = []

    # 1. Per concept: d and coherence against alpha.
    names = sorted(record["concepts"])
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        c = record["concepts"][name]
        alphas = [p["alpha"] for p in c["sweep"]]
        ax.plot(alphas, [p["d"] for p in c["sweep"]], "o-", color="tab:blue", label="Cohen's d")
        ax.axhline(GATE_D, color="tab:blue", ls=":", lw=1)
        ax.axhline(-GATE_D, color="tab:red", ls=":", lw=1)
        ax.set_title(f"{name} ({c['status']})", fontsize=10)
        ax.set_xlabel("alpha")
        twin = ax.twinx()
        twin.plot(alphas, [p["ppl_ratio"] for p in c["sweep"]], "s--", color="tab:orange", label="ppl ratio")
        twin.plot(alphas, [p["degenerate"] for p in c["sweep"]], "^--", color="tab:gray", label="looping")
        twin.axhline(PPL_RATIO_MAX, color="tab:orange", ls=":", lw=1)
        if c["max_alpha"] is not None:
            ax.axvline(c["max_alpha"], color="black", lw=0.8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{record['model']}: effect size (blue), perplexity ratio (orange), looping (grey) vs alpha")
    fig.tight_layout()
    _save(fig, out_dir / "sweeps.png")
    plt.close(fig)
    written.append(out_dir / "sweeps.png")

    # 2. Cosine similarity of the concept vectors (mean direction over the steering layers).
    vnames = sorted(vectors)
    mat = np.stack([np.mean([vectors[n].directions[layer].numpy() for layer in layers], axis=0) for n in vnames])
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    cos = mat @ mat.T
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(vnames)), vnames, rotation=90)
    ax.set_yticks(range(len(vnames)), vnames)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{record['model']}: cosine similarity of concept vectors (layers {layers[0]}-{layers[-1]})")
    _save(fig, out_dir / "cosine.png")
    plt.close(fig)
    written.append(out_dir / "cosine.png")

    # 3. PCA of the vectors beside Russell's valence-arousal circumplex.
    centred = mat - mat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    # Orient the components like the circumplex so the two panels can be compared by eye.
    val = np.array([concepts[n].valence for n in vnames])
    aro = np.array([concepts[n].arousal for n in vnames])
    if np.corrcoef(xy[:, 0], val)[0, 1] < 0:
        xy[:, 0] *= -1
    if np.corrcoef(xy[:, 1], aro)[0, 1] < 0:
        xy[:, 1] *= -1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 6))
    for ax, pts, title in ((a1, xy, "concept vectors, PCA (PC1, PC2)"), (a2, np.stack([val, aro], 1), "Russell: valence (x), arousal (y)")):
        colours = ["tab:green" if v > 0 else "tab:red" for v in val]
        ax.scatter(pts[:, 0], pts[:, 1], c=colours)
        for (x, y), n in zip(pts, vnames):
            ax.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(title)
    r_val = float(np.corrcoef(xy[:, 0], val)[0, 1])
    r_aro = float(np.corrcoef(xy[:, 1], aro)[0, 1])
    fig.suptitle(f"{record['model']}: PC1 vs valence r={r_val:.2f}, PC2 vs arousal r={r_aro:.2f} (colour: valence sign)")
    _save(fig, out_dir / "circumplex.png")
    plt.close(fig)
    written.append(out_dir / "circumplex.png")
    write_text_atomic(out_dir / "circumplex.json", json.dumps({"pc1_valence_r": r_val, "pc2_arousal_r": r_aro}, indent=2) + "\n")
    return written



def blip_comparison(records: dict[str, dict[str, Any]], concepts: list[str]) -> str:
    """Markdown: per Blip concept and model, what Blip's Chat serves, the d there, that mode's
    ceiling (also as a share of the residual norm, which differs between models; steering
    alone's where nothing is served) and perplexity ratio, and steering alone at its child-safe
    alpha. Decisions are taken from each record's own figures (`redecide`), as `assess` takes
    them."""
    from .record import blip_decision, blip_serving, redecide

    lines = [
        "| concept | model | Blip serves | d there [95%] n | its ceiling (share of residual norm) "
        "| ppl ratio there | steering alone: child-safe alpha, d [95%] n |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    decided = {model: redecide(record) for model, record in records.items()}
    for concept in concepts:
        for model, record in decided.items():
            replies = record_replies(record)
            entry = record["concepts"].get(concept)
            if entry is None:
                lines.append(f"| {concept} | {model} | not validated | - | - | - | - |")
                continue
            child = entry["child_recommended_alpha"]
            alone = "-" if child is None else f"{child:g}: {effect_text(entry, child, replies)}"
            served = blip_serving(entry, entry.get("blip") or blip_decision(entry, replies))
            if served is None:
                # Nothing served: the ceiling shown is steering alone's child-safe one, if any coherent alpha was.
                safe = entry["child_safe_alpha"]
                if safe is not None:
                    ceiling = f"steer {safe:g} ({safe / entry['activation_scale']:.3f})"
                elif all("flag_excess" in point for point in entry["sweep"]):
                    ceiling = "none child-safe"
                else:
                    ceiling = "flags not measured"
                lines.append(f"| {concept} | {model} | nothing (answered plainly) | - | {ceiling} | - | {alone} |")
                continue
            e = served.effect
            modes = entry.get("modes", {})
            if served.alpha is None:
                point, ceiling = modes["prompt"], "-"
            else:
                sweep = modes["both"] if served.mode == "both" else entry["sweep"]
                point = next(p for p in sweep if p["alpha"] == served.alpha)
                ceiling = f"{served.ceiling:g} ({served.ceiling / entry['activation_scale']:.3f})"
            at = "" if served.alpha is None else f" at {served.alpha:g}"
            lines.append(f"| {concept} | {model} | {served.mode}{at} | {e.d:.2f} [{e.low:.2f}, {e.high:.2f}] n {e.n} "
                         f"| {ceiling} | {point['ppl_ratio']:.2f} | {alone} |")
    return "\n".join(lines) + "\n"
