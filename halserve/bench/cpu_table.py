"""The markdown tables of ``halserve bench cpu``: each figure beside its ratio to the read
roofline, to llama.cpp at the same bit width and to HF transformers, all from one sitting."""
from __future__ import annotations


def _label(r: dict, dtype: str) -> str:
    if r["engine"] == "llama.cpp":
        q = r["quant"].upper()
        if not r.get("repack", True):
            return f"{q} (no repack)"
        return q if r.get("pp_repack", True) else f"{q} (pp: no repack)"
    return {"bfloat16": "bf16", "float32": "fp32"}[dtype] if r["quant"] == "none" else r["quant"]


def _peer(r: dict, rows: list[dict]) -> "dict | None":
    if r["engine"] == "llama.cpp":
        return None
    return next((p for p in rows if p["engine"] == "llama.cpp" and p.get("bits") == r.get("bits")
                 and "decode_tok_s" in p), None)


def _ok(v) -> bool:
    return v is not None and v == v and v > 0  # nan: the decode time drowned in the noise


def _x(a, b) -> str:
    return f"{a / b:.2f}" if _ok(a) and _ok(b) else "-"


def cpu_tables(rows: list[dict], bw: float, args, head: str) -> str:
    hf = next((r for r in rows if r["engine"] == "HF transformers" and "decode_tok_s" in r), None)
    ours16 = next((r for r in rows if r["engine"].startswith("halserve") and r["quant"] == "none"
                   and "weight_bytes" in r), None)
    n = args.ttft_len
    out = [f"**{head}**", "",
           f"Batch 1 ({args.input_len}-token prompt, {args.output_len} generated)"
           + (f"; TTFT of a {n}-token prompt (llama.cpp: {n} / its pp{n} tokens/s)" if n else "") + ":", "",
           "| engine | weights | batch-1 tok/s | GB/s read | % of read roofline | x llama.cpp (same bits) | x HF |"
           + (f" TTFT {n} (s) | llama.cpp TTFT / this | HF TTFT / this |" if n else ""),
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if n else "")]
    for r in rows:
        lab = _label(r, args.dtype) if "quant" in r else "-"
        if "error" in r or "decode_tok_s" not in r:
            out.append(f"| {r['engine']} | {lab} | error: {r.get('error', 'stopped by the time limit')} |")
            continue
        wb = r.get("weight_bytes") or 0
        if r["engine"] == "HF transformers" and ours16:
            wb = ours16["weight_bytes"]  # HF reads the same tensors; MoE: only the routed experts
        gbs = wb * r["decode_tok_s"] / 1e9
        peer = _peer(r, rows)
        r["read_GBps"], r["pct_read_roofline"] = gbs, 100 * gbs / bw
        if not _ok(r["decode_tok_s"]):
            out.append(f"| {r['engine']} | {lab} | noise (t(N) - t(1) <= 0) |")
            continue
        line = (f"| {r['engine']} | {lab} | {r['decode_tok_s']:.2f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | "
                f"{_x(r['decode_tok_s'], peer and peer['decode_tok_s'])} | {_x(r['decode_tok_s'], hf and hf['decode_tok_s'])} |")
        if n:
            t = r.get("ttft_s")
            line += f" {t:.3f} |" if t else " - |"
            line += f" {_x(peer and peer.get('ttft_s'), t)} | {_x(hf and hf.get('ttft_s'), t)} |"
        out.append(line)
    counts = sorted({k for r in rows for k in r.get("batch", {})}, key=int)
    if counts:
        blen = args.batch_input_len or args.input_len
        out += ["", f"Batched decode ({blen}-token prompts, {args.batch_output_len} generated each; "
                    "llama.cpp: llama-batched-bench S_TG), tokens/s over all sequences:", "",
                "| engine | weights |" + "".join(f" {c} seqs tok/s | x HF | x llama.cpp |" for c in counts),
                "| --- | --- |" + " ---: | ---: | ---: |" * len(counts)]
        for r in rows:
            b = r.get("batch") or {}
            if not b:
                continue
            peer = _peer(r, rows)
            cells = []
            for c in counts:
                v = b.get(c)
                cells.append(f" {v:.1f} | {_x(v, hf and hf['batch'].get(c))} | "
                             f"{_x(v, peer and peer.get('batch', {}).get(c))} |" if _ok(v)
                             else " noise | - | - |" if v is not None else " - | - | - |")
            out.append(f"| {r['engine']} | {_label(r, args.dtype)} |" + "".join(cells))
    return "\n".join(out)
