"""The targets the issue sets, checked against the figures, and the markdown table."""


# bench/results.md of 2026-11-25 (main at 42bc5a5, this machine): 8 streams through gRPC, no guard.
BEFORE_TTFT_8_P95_MS = 2002.4


def _tps(results: dict, case: str) -> float | None:
    m = results["single_stream"].get(case)
    return m["tokens_per_s"] if m else None


def _ours(results: dict, case: str) -> float:
    """Tokens/s of one of our own cases, which every run measures (unlike the peers)."""
    tps = _tps(results, case)
    if tps is None:
        raise ValueError(f"the results have no single-stream figure for our case {case!r}")
    return tps


def targets(results: dict) -> list[dict]:
    out = []

    def add(name: str, target: str, value: float | None, met: bool | None) -> None:
        out.append({"name": name, "target": target, "value": None if value is None else round(value, 3), "met": met})

    base, band, one = _ours(results, "unsteered"), _ours(results, "steered_band"), _ours(results, "steered_one_layer")
    add("steering overhead, whole band", "<= 0.05 (time per token)", base / band - 1, base / band - 1 <= 0.05)
    add("steering overhead, one layer", "<= 0.05 (time per token)", base / one - 1, base / one - 1 <= 0.05)
    for peer in ("repeng", "steering_vectors"):
        theirs = _tps(results, peer)
        ratio = band / theirs if theirs else None
        add(f"ours steered / {peer} steered", ">= 1.0", ratio, None if ratio is None else ratio >= 1.0)
    conc = results.get("concurrency", {})
    if "1" in conc and "8" in conc:
        scale = conc["8"]["tokens_per_s"] / conc["1"]["tokens_per_s"]
        add("8 differently-steered streams / 1 stream, through gRPC", ">= 4.0", scale, scale >= 4.0)
    kl = band / _ours(results, "steered_band_kl")
    add("KL monitoring cost (steered+KL time / steered time)", "<= 1.6", kl, kl <= 1.6)
    added = results["grpc_ttft"]["added_ms"]
    add("gRPC added time to first token (ms, beyond the engine, gRPC minus in process)", "<= 15", added, added <= 15)
    for name, c in results.get("faster", {}).get("cases", {}).items():
        add(f"{name} / transformers generate of the fp32 model, one stream", ">= 1.8", c["vs_transformers_generate"],
            c["vs_transformers_generate"] >= 1.8)
    hold = results["guard_hold"]
    add(f"{hold['streams']} streams, one guard-held: drop in the others' tokens/s", "<= 0.10", hold["drop"],
        hold["drop"] <= 0.10)
    ttft = results["first_token"]["prefix_cache_on"]["p50_ms"]
    add("time to first token in process, p50, new ~40-token prompts (ms)", "<= 150", ttft, ttft <= 150)
    if "8" in conc:
        p95 = conc["8"]["ttft_ms_p95"]
        add(f"time to first token at 8 streams, p95 (ms; half of {BEFORE_TTFT_8_P95_MS} at 42bc5a5)",
            f"<= {BEFORE_TTFT_8_P95_MS / 2:g}", p95, p95 <= BEFORE_TTFT_8_P95_MS / 2)
    chat = results["chat_first_sentence"]
    today = chat["prefix_cache_on"]
    ratio = today["p50_ms"] / chat["gate_on_prefix_cache_off"]["p50_ms"]
    add(f"Blip time to first sentence, p50, the child answering {today.get('pause_s', 0):g} s after a reply: today "
        "(prefix cache on and warmed, gate off) / before (cache off, gate on)", "<= 0.6", ratio, ratio <= 0.6)
    return out


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    lines = [
        f"# Benchmark: {r['model']}{' (smoke run: sizes too small to mean anything)' if r['smoke'] else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}. Run {r['started']}. `make bench`.",
        f"Single stream: greedy, {s['tokens']} tokens per prompt over {len(s['prompts'])} prompts, median of "
        f"{s['runs']} interleaved runs; concept {s['concept']} at alpha {s['alpha']:g} on layers "
        f"{s['band'][0]}-{s['band'][-1]} (one-layer case: layer {s['one_layer']}).",
        "",
        "## Single stream, in process",
        "",
        _row("case", "tokens/s", "runs", "vs unsteered"),
        _row("---", "---:", "---", "---:"),
    ]
    base = r["single_stream"]["unsteered"]["tokens_per_s"]
    for name, c in r["single_stream"].items():
        note = " (same text as ours)" if c.get("same_text_as_ours") else (
            " (text differs from ours)" if c.get("same_text_as_ours") is False else "")
        lines.append(_row(name + note, c["tokens_per_s"], ", ".join(map(str, c["runs_tokens_per_s"])),
                          f"{c['tokens_per_s'] / base:.3f}"))
    for name, why in r.get("peers_missing", {}).items():
        lines.append(_row(name, "-", why, "-"))
    lines += ["", "## Concurrent streams through gRPC, each with a different concept", "",
              _row("streams", "aggregate tokens/s", "x single", "TTFT p50 ms", "TTFT p95 ms"),
              _row("---:", "---:", "---:", "---:", "---:")]
    conc = r.get("concurrency", {})
    one = conc.get("1", {}).get("tokens_per_s")
    for n, c in conc.items():
        lines.append(_row(n, c["tokens_per_s"], f"{c['tokens_per_s'] / one:.2f}" if one else "-",
                          c["ttft_ms_p50"], c["ttft_ms_p95"]))
    g, t, d, mem, p = r["grpc_ttft"], r["tagger"], r["derivation"], r["memory"], r["physical_limit"]
    lines += [
        "", "## Latency, derivation, memory, the physical limit", "",
        _row("figure", "value"), _row("---", "---:"),
        *(_row(f"time to first token in process, p50, {f['prompt_tokens']:g}-token prompts each new, steered, "
               f"{name.replace('_', ' ')} (ms)", f["p50_ms"]) for name, f in r["first_token"].items()),
        *(_row(f"the same on {r['faster']['model']}, {name.replace('_', ' ')} (ms)", f["p50_ms"])
          for name, f in r.get("first_token_faster", {}).items()),
        _row(f"{(h := r['guard_hold'])['streams']} streams of {h['tokens']} tokens: the others' tokens/s without / "
             "with one of them held by the content guard", " / ".join(map(str, h["others_tokens_per_s"].values()))),
        *(_row(f"a {r['join_stall']['joiner_prompt_tokens']}-token prompt joins a running stream, prefilled "
               f"{name.replace('_', ' ')}: the runner's longest wait for a token / the joiner's time to first token "
               "(ms)", f"{c['runner_longest_gap_ms']} / {c['joiner_ttft_ms']}")
          for name, c in r["join_stall"].items() if isinstance(c, dict)),
        _row("time to first token through gRPC, p50 (ms)", g["grpc_ms_p50"]),
        _row("beyond the engine's own time to first token: in process / through gRPC, p50 (ms)",
             f"{g['in_process_beyond_engine_ms_p50']} / {g['grpc_beyond_engine_ms_p50']}"),
        _row("tagger latency p50 / p95 (ms)", f"{t['p50_ms']} / {t['p95_ms']}"),
        *(_row(f"Blip through Chat, 1 stream, {name.replace('_', ' ')}: time to first sentence p50 / p95 "
               f"(ms, {c['turns']} turns in conversations, the child answering {c.get('pause_s', 0):g} s after a "
               "reply)", f"{c['p50_ms']} / {c['p95_ms']}")
          for name, c in r["chat_first_sentence"].items()),
        _row(f"derivation of {d['concepts']} concepts (s)", d["seconds"]),
        _row("generator peak memory (MB)", mem["generator_peak_mb"]),
        _row("tagger peak memory (MB)", mem["tagger_peak_mb"]),
        _row("memory bandwidth, large copy (GB/s)", p["bandwidth_gb_s"]),
        _row("weights read per token (MB)", round(p["weight_bytes"] / 2**20)),
        _row("batch-1 ceiling: bandwidth / weight bytes (tokens/s)", p["roofline_tokens_per_s"]),
        _row("achieved batch-1 unsteered (tokens/s, fraction of ceiling)",
             f"{p['achieved_unsteered_tokens_per_s']} ({p['fraction_of_roofline']:.0%})"),
        *(["", f"## A faster path: {f['model']}, one stream, in the same interleaved runs as above", "",
            _row("case", "tokens/s", "x transformers generate (fp32)", "weights read per token (MB)",
                 "its ceiling (tokens/s)", "fraction of its ceiling"),
            _row("---", "---:", "---:", "---:", "---:", "---:"),
            *(_row(name, c["tokens_per_s"], c["vs_transformers_generate"], round(f["weight_bytes"] / 2**20),
                   f["roofline_tokens_per_s"], f"{c['fraction_of_roofline']:.0%}") for name, c in f["cases"].items())]
          if (f := r.get("faster")) else []),
        *(["", "## Larger models, one stream, in their own interleaved runs after the ones above", "",
            _row("model", "steered at alpha", "unsteered (tokens/s)", "steered band (tokens/s)",
                 "weights read per token (MB)", "batch-1 ceiling (tokens/s)", "unsteered, fraction of ceiling"),
            _row("---", "---:", "---:", "---:", "---:", "---:", "---:"),
            *(_row(name, o["alpha"], o["cases"].get(f"{name}_unsteered"), o["cases"].get(f"{name}_steered_band", "-"),
                   round(o["weight_bytes"] / 2**20), o["roofline_tokens_per_s"],
                   f"{o['cases'][f'{name}_unsteered'] / o['roofline_tokens_per_s']:.0%}")
              for name, o in r["others"].items() if "cases" in o),
            *(f"- {name}: not measured: {o['missing']}" for name, o in r["others"].items() if "missing" in o)]
          if r.get("others") else []),
        "", "## Targets", "", _row("target", "wanted", "measured", "met"), _row("---", "---", "---:", "---"),
    ]
    for x in r["targets"]:
        lines.append(_row(x["name"], x["target"], "-" if x["value"] is None else x["value"],
                          {True: "yes", False: "**no**", None: "not measured"}[x["met"]]))
    return "\n".join(lines) + "\n"
