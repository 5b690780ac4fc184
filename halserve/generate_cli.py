"""``halserve generate`` (one prompt, streamed to stdout) and ``halserve chat`` (a REPL)."""
from __future__ import annotations

import argparse
import sys


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by generate, chat and serve (vLLM's names)."""
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory (default: the demo model shipped with halserve)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size in GiB (default: 1 GiB on CPU, gpu-memory-utilization on GPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backend", default=None, help="force a backend (see `halserve probe`)")
    p.add_argument("--seed", type=int, default=0)
    from halserve.config import QUANTIZATIONS

    p.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                   help="weights quantized at load; a backend that cannot run a scheme refuses it by name")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="the lm_head in the --quantization scheme too (as llama.cpp's Q8_0/Q4_0 files; default: "
                        "logits from the unquantized lm_head, as vLLM)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model dtype), or fp8 / fp8_e4m3: an e4m3 KV cache with per-layer scales "
                        "from the checkpoint, else 1.0 (half the KV memory; docs/kv_cache_fp8.md)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--batch-invariant", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch step n+1 while step n runs (default: on where the backend has a "
                        "device to overlap with and the options allow; on where it cannot is refused)")
    p.add_argument("--kv-offloading-size", type=float, default=0.0, help="host KV tier size in GiB")
    p.add_argument("--kv-offload-dir", default=None, help="filesystem KV tier directory")
    p.add_argument("--kv-offload-disk-size", type=float, default=16.0,
                   help="filesystem KV tier budget in GiB (default 16)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s form: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        '(methods: ngram with prompt_lookup_max/min, draft_model with model, eagle with model = '
                        'an EAGLE head directory; callable from Python only)')


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enable_prefix_caching=args.enable_prefix_caching, backend=args.backend, seed=args.seed,
              quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
              enforce_eager=args.enforce_eager,
              batch_invariant=args.batch_invariant, kv_cache_dtype=args.kv_cache_dtype)
    if getattr(args, "speculative_config", None):
        import json

        try:
            kw["speculative_config"] = json.loads(args.speculative_config)
        except ValueError as e:
            raise ValueError(f"--speculative-config {args.speculative_config!r} is not valid JSON ({e})") from None
    if getattr(args, "async_scheduling", None) is not None:
        kw["async_scheduling"] = args.async_scheduling
    if args.kv_cache_memory is not None:  # 0 or less is refused by name, not taken as unset
        kw["kv_cache_memory"] = int(args.kv_cache_memory * (1 << 30))
    if args.kv_offloading_size:
        kw["kv_offload_host_bytes"] = int(args.kv_offloading_size * (1 << 30))
    if args.kv_offload_dir:
        kw["kv_offload_dir"] = args.kv_offload_dir
        kw["kv_offload_disk_bytes"] = int(args.kv_offload_disk_size * (1 << 30))
    return kw


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")


def _params(args):
    from halserve.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sample_seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    _sampling_arguments(p)
    p.add_argument("--prompt", default="def ", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


def _engine(args):
    import logging

    from halserve.engine.llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return LLM(args.model, **engine_kwargs(args))


def main(args: argparse.Namespace) -> int:
    params = _params(args)  # validate before the model loads
    llm = _engine(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    c = out.outputs[0]
    print(args.prompt + c.text if not args.chat else c.text)
    print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    _sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")


def chat_main(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("halserve chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params)[0].outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})
    return 0
