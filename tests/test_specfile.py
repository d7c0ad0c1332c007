"""Spec files and KEY=VALUE overrides over them (darkstore/specfile.py)."""

from __future__ import annotations

import pytest
import yaml

from darkstore.errors import SpecError
from darkstore.specfile import apply_overrides
from student_trainer.sweep import GridSpec


def test_overrides_set_dotted_keys_as_yaml_values_without_changing_the_original():
    doc = {"base": {"epochs": 30, "student": {"arch": "mlp"}}, "grid": {"seed": [0]}}
    got = apply_overrides(doc, ["base.epochs=3", "grid.seed=[0, 1]", "base.student.arch_kwargs.hidden=[8]",
                                "base.loss=kl", "base.lr=1e-3"])
    assert got == {"base": {"epochs": 3, "student": {"arch": "mlp", "arch_kwargs": {"hidden": [8]}}, "loss": "kl",
                            "lr": "1e-3" if isinstance(yaml.safe_load("1e-3"), str) else 1e-3},
                   "grid": {"seed": [0, 1]}}
    assert doc["base"]["epochs"] == 30
    for bad in ("epochs", "=3", "base.epochs.x=1"):
        with pytest.raises(SpecError, match="--set"):
            apply_overrides(doc, [bad])


def test_a_grid_file_takes_overrides(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"store": "s", "base": {"epochs": 5, "student": {"arch": "mlp"}},
                                                    "grid": {"alpha": [0.5]}}))
    spec = GridSpec.from_file(tmp_path / "g.yaml", ["base.epochs=1", "grid.alpha=[0, 1]"])
    assert spec.base["epochs"] == 1 and spec.grid["alpha"] == [0, 1] and spec.store == str(tmp_path / "s")
