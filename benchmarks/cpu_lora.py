"""Multi-LoRA throughput on the CPU: vLLM's stock torch ops against the plugin's grouped ops.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``; ``--model dev`` also needs
``cs-fetch-models``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.cpu_lora --model tiny
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.cpu_lora --model dev

One engine (vLLM ``LLM``, in this process, the dev config's settings: ``enforce_eager``,
2 GiB KV cache, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless ``--reserved-cpu`` says
otherwise, up to 4 LoRA slots of rank 16) generates 16 prompts x 64 tokens (greedy, EOS
ignored so every answer is 64 tokens) for each mix of requests: all on the base model, all
on one r=8 adapter, spread over 4 adapters, half base and half on one adapter. Each mix
runs with vLLM's own LoRA ops and with the grouped ops (``services/vllm_plugins/cpu_lora.py``),
swapped in the running engine. Outputs of the two are compared token by token (the stock
ops are wrong for base rows in mixed batches: that mix is compared on its adapter rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import resolve_model, table, write_report

PROMPTS = [
    f"Customer question {n}: how do I return the lamp I bought last week, and who pays shipping?" for n in range(16)
]
MIXES = ("base", "one adapter", "4 adapters", "half base")


def lora_for(mix: str, n: int, adapters: list[Any]) -> Any:
    """The adapter of prompt ``n`` in a mix (None = base model)."""
    if mix == "base" or (mix == "half base" and n % 2 == 0):
        return None
    return adapters[n % len(adapters)] if mix == "4 adapters" else adapters[0]


def main() -> None:
    """Build adapters, start one engine, time every mix with both op sets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built now), dev (the 0.5B dev model) or a folder")
    parser.add_argument("--reserved-cpu", default="0", help="VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM's default: 1)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"which of {', '.join(MIXES)}")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA A and B weights")
    parser.add_argument("--dtype", help="instead of the model's default (tiny: float32, dev: bfloat16)")
    args = parser.parse_args()
    os.environ.update(
        {
            "HF_HUB_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: its ops can be swapped
            "VLLM_CPU_NUM_OF_RESERVED_CPU": args.reserved_cpu,
        }
    )
    from cs_testing.tiny_models import build_tiny_lora

    with tempfile.TemporaryDirectory(prefix="cs-lora-bench-") as tmp:
        workdir = Path(tmp)
        model, dtype = resolve_model(args.model, workdir)
        dtype = args.dtype or dtype
        started = time.monotonic()
        # Weights of a trained adapter's size (a random std of 0.3 swamps the base model, and its
        # chaotic output turns any rounding difference into other tokens).
        folders = [build_tiny_lora(model, workdir / f"adapter-{n}", seed=n, std=args.lora_std) for n in range(1, 5)]
        print(f"4 random r=8 adapters built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        mixes = [mix for mix in MIXES if mix in args.mixes.split(",")]
        rows, equal = run(model, dtype, folders, args.repeats, ["base", *(m for m in mixes if m != "base")])
    base = {ops: rows[("base", ops)] for ops in ("stock", "grouped")}
    table_rows = [
        [mix, rows[(mix, "stock")], rows[(mix, "grouped")], rows[(mix, "stock")] / base["stock"],
         rows[(mix, "grouped")] / base["grouped"], rows[(mix, "grouped")] / rows[(mix, "stock")], equal[mix]]
        for mix in equal
    ]  # fmt: skip
    sections = [
        f"Model `{args.model}` ({dtype}), 4 random r=8 adapters (std {args.lora_std}), 16 prompts x 64 tokens, "
        f"`VLLM_CPU_NUM_OF_RESERVED_CPU={args.reserved_cpu}`; "
        "output tokens/s of one `LLM.generate` call per mix and op set.\n\n"
        + table(
            [
                "requests",
                "stock tok/s",
                "grouped tok/s",
                "stock / base",
                "grouped / base",
                "speed-up",
                "outputs equal to stock",
            ],
            table_rows,
        )
        + "\n\nOutputs equal: prompts whose 64 tokens are identical with both op sets (for `half base`, the "
        "adapter prompts only: the stock ops give base rows an adapter's delta).",
    ]
    name = f"cpu_lora-{Path(args.model).name}-{dtype}-reserved{args.reserved_cpu}"
    if list(equal) != list(MIXES):
        name += "-" + "-".join(mix.replace(" ", "_") for mix in equal)
    write_report(
        name,
        f"Multi-LoRA on the CPU ({args.model})",
        " ".join(["python -m benchmarks.cpu_lora", *sys.argv[1:]]),
        sections,
        {},
    )


def run(
    model: Path, dtype: str, folders: list[Path], repeats: int, mixes: list[str]
) -> tuple[dict[tuple[str, str], float], dict[str, str]]:
    """Tokens/s per (mix, op set) and how many outputs the op sets agree on per mix."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from services.vllm_plugins import cpu_lora

    llm = LLM(
        model=str(model), dtype=dtype, enable_lora=True, max_lora_rank=16, max_loras=4, max_model_len=1024,
        kv_cache_memory_bytes=2 * 1024**3, enforce_eager=True, distributed_executor_backend="uni",
    )  # fmt: skip
    if not cpu_lora.STOCK:
        sys.exit("the cpu_lora plugin is not active in this process (is the project installed?)")
    adapters = [LoRARequest(f"adapter-{n}", n, str(folder)) for n, folder in enumerate(folders, start=1)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    op_sets = {"stock": cpu_lora.STOCK, "grouped": cpu_lora.REPLACEMENTS}
    speeds: dict[tuple[str, str], float] = {}
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for ops, functions in op_sets.items():
        cpu_lora.install(dict(functions))
        llm.generate(PROMPTS[:4], params, lora_request=adapters, use_tqdm=False)  # warm-up: every adapter loaded
        for mix in mixes:
            loras = [lora_for(mix, n, adapters) for n in range(len(PROMPTS))]
            best = 0.0
            for _ in range(repeats):
                started = time.perf_counter()
                result = llm.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
                seconds = time.perf_counter() - started
                best = max(best, sum(len(r.outputs[0].token_ids) for r in result) / seconds)
            speeds[(mix, ops)] = best
            outputs[(mix, ops)] = [list(r.outputs[0].token_ids) for r in result]
            print(f"{ops:>7} {mix:<12} {best:8.1f} tok/s", file=sys.stderr)
    cpu_lora.install(cpu_lora.REPLACEMENTS)
    equal = {}
    for mix in mixes:
        compared = [n for n in range(len(PROMPTS)) if mix != "half base" or lora_for(mix, n, adapters) is not None]
        same = sum(outputs[(mix, "stock")][n] == outputs[(mix, "grouped")][n] for n in compared)
        prefix = [_common_prefix(outputs[(mix, "stock")][n], outputs[(mix, "grouped")][n]) for n in compared]
        equal[mix] = f"{same}/{len(compared)} (first difference after {min(prefix)} tokens at the earliest)"
    return speeds, equal


def _common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading tokens two outputs share."""
    return next(
        (n for n, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), min(len(first), len(second))
    )


if __name__ == "__main__":
    main()
