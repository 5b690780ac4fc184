"""``halserve bench latency``: batch-1 decode ms/token against the bandwidth roofline and HF.

Random-weight models are made from configs (``--preset llama-1b | llama-8b | qwen3-moe``):
transformers builds the model on the device and saves it, so halserve and the HF peer read
the same weights. The decode step (forward + logits + greedy pick, feeding its own output
and advancing position/slot on the device) is captured as one CUDA graph through
``hal.capture_graph`` (``--enforce-eager`` calls it directly instead) and timed with events.

Roofline: bytes one step must read (every weight once, MoE experts at top_k/E, plus the KV
cache at the mean context) over the device-to-device copy bandwidth measured in the same run.
Several variants (``--variants bf16,fp8,bf16-bi,bf16-eager``) run in one process on one
checkpoint. Prints a table and, with ``--json``, writes the numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

PRESETS: dict[str, tuple[str, dict]] = {
    # Llama-3.2-1B shape (tied embeddings)
    "llama-1b": ("LlamaForCausalLM", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                          num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                          tie_word_embeddings=True, head_dim=64)),
    # Llama-3.1-8B shape
    "llama-8b": ("LlamaForCausalLM", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                          tie_word_embeddings=False)),
    # Qwen3-30B-A3B layer shape (128 experts, top-8) with 8 of its 48 layers
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32,
                                              num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                                              intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                              vocab_size=151936, tie_word_embeddings=False)),
}
_COMMON = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
               eos_token_id=2, initializer_range=0.02)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b", help="random-weight model shape")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of --preset")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--workdir", default=None, help="where random checkpoints go (default /dev/shm or /tmp)")
    p.add_argument("--backend", default=None, help="HAL backend (default: highest probe score)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default="bf16",
                   help="comma list of bf16 | fp8 | bf16-bi | fp8-bi | bf16-eager | fp8-eager")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-peer", action="store_true", help="also time HF transformers generate on the same card")
    p.add_argument("--json", default=None, help="write results here")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs (median)")


# ---- shared helpers (also used by bench throughput) ----------------------------------------------
def hf_config(preset: str, num_layers: int | None = None):
    import transformers

    arch, over = PRESETS[preset]
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = {**_COMMON, **over}
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    return arch, cfg_cls(**kw)


def build_hf_model(preset: str, num_layers: int | None, device: str = "cuda"):
    import torch
    import transformers

    arch, cfg = hf_config(preset, num_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, arch)._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def checkpoint_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    root = args.workdir
    if root is None:
        shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        root = "/dev/shm/halserve-bench" if shm > (40 << 30) else "/tmp/halserve-bench"
    layers = f"-l{args.num_layers}" if args.num_layers else ""
    return Path(root) / f"{args.preset}{layers}"


def ensure_checkpoint(args, hf_model=None) -> Path:
    path = checkpoint_dir(args)
    if (path / "config.json").is_file():
        return path
    model = hf_model if hf_model is not None else build_hf_model(args.preset, args.num_layers)
    t = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="4GB")
    print(f"[bench] wrote random {args.preset} checkpoint to {path} in {time.perf_counter() - t:.1f}s", flush=True)
    return path


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def card_name() -> str:
    import torch

    p = torch.cuda.get_device_properties(0)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"


def variant_options(v: str) -> dict:
    parts = v.split("-")
    if parts[0] not in ("bf16", "fp8") or any(x not in ("bi", "eager") for x in parts[1:]):
        raise ValueError(f"variant {v!r} is not valid; use bf16|fp8 with optional -bi and/or -eager")
    return dict(quantization="fp8" if parts[0] == "fp8" else None, batch_invariant="bi" in parts,
                enforce_eager="eager" in parts)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode token reads: packed weights, norm weights, MoE experts at
    top_k / E (each token reads top_k experts per layer)."""
    from halserve.hal.interface import PackedWeight

    seen: set[int] = set()
    total = 0

    def pw_bytes(w: PackedWeight) -> int:
        n = w.weight.numel() * w.weight.element_size()
        if w.scale is not None:
            n += w.scale.numel() * w.scale.element_size()
        return n

    def walk(obj, depth=0):
        nonlocal total
        if id(obj) in seen or depth > 12:
            return
        seen.add(id(obj))
        if isinstance(obj, PackedWeight):
            total += pw_bytes(obj)
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
            return
        if isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)
            return
        if not hasattr(obj, "__dict__") or type(obj).__module__.startswith(("torch", "builtins")):
            return
        name = type(obj).__name__
        if name == "Embedding":
            return
        spec = getattr(obj, "spec", None)
        if name == "MoE" and spec is not None:
            e = obj.w13.weight.shape[0]
            seen.update((id(obj.w13), id(obj.w2)))
            total += (pw_bytes(obj.w13) + pw_bytes(obj.w2)) * min(spec.top_k, e) // e
        if name == "RMSNorm":
            w = obj.weight
            total += w.numel() * w.element_size()
            return
        for x in vars(obj).values():
            walk(x, depth + 1)

    walk(model)
    return total


# ---- our decode loop -----------------------------------------------------------------------------
class DecodeLoop:
    """Batch-1 greedy decode over the paged KV cache, advancing entirely on the device, so one
    step can be captured as a CUDA graph and replayed back to back."""

    def __init__(self, model, mc, hal, input_len: int, output_len: int, block_size: int = 16):
        import torch

        from halserve.hal.interface import AttentionMetadata

        self.model, self.mc, self.hal = model, mc, hal
        dev = hal.device
        self.bs = block_size
        self.input_len = input_len
        total = input_len + output_len + 1
        nblocks = -(-total // block_size)
        shape = hal.kv_cache_shape(nblocks, block_size, mc.num_kv_heads, mc.head_dim)
        self.caches = [torch.zeros(shape, dtype=mc.dtype, device=dev) for _ in range(mc.num_layers)]
        self.kv_bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * \
            torch.empty((), dtype=mc.dtype).element_size()
        self.table = torch.arange(nblocks, dtype=torch.int32, device=dev)[None]
        self.ids = torch.zeros(1, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            seq_lens=torch.ones(1, dtype=torch.int32, device=dev), block_tables=self.table,
            slot_mapping=torch.zeros(1, dtype=torch.int64, device=dev), max_seqlen_q=1,
            max_seqlen_k=total, query_lens_host=[1], seq_lens_host=[total], block_size=block_size,
            num_decode_seqs=1)
        self.graph = None

    def prefill(self, prompt) -> None:
        import torch

        from halserve.hal.interface import AttentionMetadata

        dev = self.hal.device
        n = len(prompt)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev), block_tables=self.table,
            slot_mapping=torch.arange(n, dtype=torch.int64, device=dev), max_seqlen_q=n, max_seqlen_k=n,
            query_lens_host=[n], seq_lens_host=[n], block_size=self.bs)
        h = self.model.forward(torch.tensor(prompt, device=dev), torch.arange(n, device=dev), self.caches, meta)
        logits = self.model.compute_logits(h[-1:])
        self.ids.copy_(logits.argmax(-1))
        self.pos.fill_(n)

    def step(self):
        m = self.meta
        m.seq_lens.copy_(self.pos + 1)
        m.slot_mapping.copy_(self.pos)  # the table is the identity: slot == position
        logits = self.model.compute_logits(self.model.forward(self.ids, self.pos, self.caches, m))
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return self.ids

    def capture(self) -> bool:
        self.graph = self.hal.capture_graph(self.step)
        return self.graph is not None

    def run(self, steps: int) -> float:
        """Run ``steps`` decode steps from the end of the prompt; returns seconds per step."""
        import torch

        self.pos.fill_(self.input_len)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / steps


def hf_decode_ms(hf_model, input_len: int, output_len: int, batch: int = 1) -> float:
    """HF generate: (time for output_len tokens - time for 1) / (output_len - 1), in ms."""
    import torch

    ids = torch.randint(5, hf_model.config.vocab_size, (batch, input_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(4)  # warm-up
    t1 = gen(1)
    tn = gen(output_len)
    return (tn - t1) / (output_len - 1) * 1e3


def run_variant(path: Path, args, variant: str, bw_gbs: float) -> dict:
    import torch

    from halserve import hal as hal_mod
    from halserve.models.loader import load_model

    opts = variant_options(variant)
    hal = hal_mod.create(args.backend, batch_invariant=opts["batch_invariant"]) if args.backend else \
        hal_mod.select(None, batch_invariant=opts["batch_invariant"])
    t = time.perf_counter()
    model, mc = load_model(path, hal, dtype=args.dtype, quantization=opts["quantization"])
    load_s = time.perf_counter() - t
    loop = DecodeLoop(model, mc, hal, args.input_len, args.output_len)
    with torch.inference_mode():
        prompt = torch.randint(5, mc.vocab_size, (args.input_len,)).tolist()
        loop.prefill(prompt)
        loop.run(3)  # compile / autotune
        graphs = False if opts["enforce_eager"] else loop.capture()
        runs = sorted(loop.run(args.output_len) for _ in range(args.repeats))
    per_step = runs[len(runs) // 2]
    wbytes = weight_bytes_per_token(model)
    kv = loop.kv_bytes_per_token * (args.input_len + args.output_len // 2)
    roof_s = (wbytes + kv) / (bw_gbs * 1e9)
    res = dict(variant=variant, ms_per_token=per_step * 1e3, tokens_per_s=1 / per_step,
               bytes_per_step=wbytes + kv, roofline_ms=roof_s * 1e3, pct_roofline=100 * roof_s / per_step,
               cuda_graphs=graphs, load_s=load_s, backend=hal.describe())
    del loop, model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def print_table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(format(r.get(k, ""), f) if r.get(k) is not None else "-" for _, k, f in cols) + " |")


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench latency: needs a CUDA device (the roofline is a device-memory measure)")
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_options(v)
    out: dict = dict(bench="latency", card=card_name(), date=time.strftime("%Y-%m-%d"), preset=args.preset,
                     num_layers=args.num_layers, input_len=args.input_len, output_len=args.output_len)
    hf_model = None
    if args.hf_peer or not (checkpoint_dir(args) / "config.json").is_file():
        hf_model = build_hf_model(args.preset, args.num_layers) if not args.model else None
    path = ensure_checkpoint(args, hf_model)
    if args.hf_peer:
        if hf_model is None:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        out["hf_ms_per_token"] = hf_decode_ms(hf_model, args.input_len, args.output_len)
        print(f"[bench] HF transformers generate: {out['hf_ms_per_token']:.2f} ms/token", flush=True)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    out["copy_bw_gbs"] = copy_bandwidth_gbs()
    print(f"[bench] {out['card']}: device copy bandwidth {out['copy_bw_gbs']:.0f} GB/s", flush=True)
    rows = []
    for v in variants:
        r = run_variant(path, args, v, out["copy_bw_gbs"])
        if out.get("hf_ms_per_token"):
            r["speedup_vs_hf"] = out["hf_ms_per_token"] / r["ms_per_token"]
        rows.append(r)
        print(f"[bench] {args.preset} {v}: {r['ms_per_token']:.3f} ms/token, {r['pct_roofline']:.1f}% of roofline "
              f"({r['bytes_per_step'] / 1e9:.2f} GB/step), graphs={r['cuda_graphs']}", flush=True)
    base = {r["variant"]: r for r in rows}
    for r in rows:
        if r["variant"].startswith("fp8") and "bf16" + r["variant"][3:] in base:
            r["vs_bf16"] = base["bf16" + r["variant"][3:]]["ms_per_token"] / r["ms_per_token"]
        if "-bi" in r["variant"] and r["variant"].replace("-bi", "") in base:
            r["bi_overhead_pct"] = 100 * (r["ms_per_token"] / base[r["variant"].replace("-bi", "")]["ms_per_token"] - 1)
    out["rows"] = rows
    print_table(f"latency {args.preset} on {out['card']} (batch 1, {args.input_len} in, {args.output_len} out)", rows,
                [("variant", "variant", "s"), ("ms/token", "ms_per_token", ".3f"), ("% roofline", "pct_roofline", ".1f"),
                 ("GB/step", "bytes_per_step", ".3e"), ("x HF", "speedup_vs_hf", ".2f"), ("fp8 x bf16", "vs_bf16", ".2f"),
                 ("BI overhead %", "bi_overhead_pct", ".1f"), ("graphs", "cuda_graphs", "")])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0
