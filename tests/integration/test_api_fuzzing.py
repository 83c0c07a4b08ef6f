"""The app's own OpenAPI, fuzzed with schemathesis over loopback: no 5xx, no contract violation.

Its own app (tiny models), since the admin routes are fuzzed with the admin key: whatever
the generated requests register, sync or delete stays in this module.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sample_app

pytestmark = pytest.mark.integration

SCHEMATHESIS = shutil.which("schemathesis") or str(Path(__file__).parents[2] / ".venv" / "bin" / "schemathesis")


@pytest.fixture(scope="module")
def base_url(
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    adapters_dir: Path,
) -> Iterator[str]:
    with sample_app(
        "fuzz", ray_cluster["http_url"], tmp_path_factory.mktemp("fuzz"), minilm_dir, tiny_llm_dir,
        llm={"adapters": adapters_dir, "max_model_len": 1280},
        orchestrator={"admin_api_keys": ["admin-key"], "sampling": {"temperature": 0, "max_tokens": 8}},
    ) as url:  # fmt: skip
        yield url


def fuzz(
    workdir: Path, base_url: str, header: str, paths: str, examples: int, *excluded_checks: str
) -> tuple[int, str]:
    """Run schemathesis over the routes matching ``paths`` (its cache in ``workdir``); its exit code and report."""
    command = [
        SCHEMATHESIS, "run", f"{base_url}/openapi.json", "--url", base_url,
        "--header", header, "--include-path-regex", paths,
        "--checks", "all", "--max-examples", str(examples), "--seed", "7",
        "--request-timeout", "60", "--no-color",
        # Text that is not text (lone surrogates, NUL) is a 400 stated in the API's description,
        # which a schema cannot express; tests/test_request_hygiene.py proves that rule.
        "--generation-codec", "utf-8", "--generation-allow-x00", "false",
    ]  # fmt: skip
    if excluded_checks:
        command += ["--exclude-checks", ",".join(excluded_checks)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=workdir)
    return done.returncode, done.stdout + done.stderr


def requests_sent(report: str) -> int:
    """The number of generated test cases schemathesis reports."""
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) generated", report)]
    return sum(counts)


def test_the_public_api_answers_every_generated_request_within_its_contract(base_url: str, tmp_path: Path) -> None:
    code, report = fuzz(tmp_path, base_url, "Authorization: Bearer test-key", "^/v1/", 150)
    assert code == 0, report[-6000:]
    assert requests_sent(report) >= 600, report[-2000:]


def test_the_admin_api_answers_every_generated_request_within_its_contract(base_url: str, tmp_path: Path) -> None:
    # An admin request can be schema-valid and still name what is not there or not right (an
    # adapter folder nobody placed, bytes that are no archive): a 400 naming it is the answer,
    # so acceptance of schema-valid data is not checked here; everything else is.
    code, report = fuzz(tmp_path, base_url, "X-API-Key: admin-key", "^/admin/", 40, "positive_data_acceptance")
    assert code == 0, report[-6000:]
    assert requests_sent(report) >= 400, report[-2000:]
