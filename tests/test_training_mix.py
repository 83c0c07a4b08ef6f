"""``cs-train-adapter`` mixes datasets with a record count per dataset, as a brand-identity recipe does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cs_tools.train_adapter import DatasetSpec, mix_datasets


def dataset(path: Path, prefix: str, n: int) -> Path:
    path.write_text(
        json.dumps([{"instruction": f"{prefix} {i}?", "output": f"{prefix} answer {i}."} for i in range(n)])
    )
    return path


def test_a_dataset_spec_is_a_path_with_an_optional_count() -> None:
    assert DatasetSpec.parse("identity.json:200") == DatasetSpec(Path("identity.json"), 200)
    assert DatasetSpec.parse("reviewed.json") == DatasetSpec(Path("reviewed.json"), None)
    assert DatasetSpec.parse("dir:with:colons/data.json") == DatasetSpec(Path("dir:with:colons/data.json"))
    with pytest.raises(ValueError, match="at least 1"):
        DatasetSpec.parse("identity.json:0")


def test_each_dataset_gives_its_count_upsampled_or_sampled_and_the_rest_each_once(tmp_path: Path) -> None:
    identity = dataset(tmp_path / "identity.json", "who", 3)
    reviewed = dataset(tmp_path / "reviewed.json", "policy", 5)
    general = dataset(tmp_path / "general.json", "general", 50)
    specs = [DatasetSpec(identity, 10), DatasetSpec(reviewed), DatasetSpec(general, 7)]
    records, drawn = mix_datasets(specs, seed=0)
    assert drawn == {str(identity): 10, str(reviewed): 5, str(general): 7}
    questions = [r.instruction for r in records]
    assert all(questions.count(f"who {i}?") >= 3 for i in range(3))  # every identity record, repeated
    assert sorted(q for q in questions if q.startswith("policy")) == [f"policy {i}?" for i in range(5)]
    assert len({q for q in questions if q.startswith("general")}) == 7  # a sample, no repeats
    assert mix_datasets(specs, seed=0)[0] == records  # seeded: the same mix again


def test_a_bad_dataset_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match=r"bad\.json"):
        mix_datasets([DatasetSpec(bad, 3)], seed=0)
