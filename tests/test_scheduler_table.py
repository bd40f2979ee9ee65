"""docs/diffusers-schedulers.md's table covers every scheduler class the installed diffusers exports, and is what
scripts/scheduler_table.py generates (so it cannot go stale)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")

from kds_hook import KDS  # noqa: E402
from kds_hook.diffusers import SUPPORTED_SCHEDULERS, T_FRAC_RULES, UNSUPPORTED_SCHEDULERS, apply_patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),  # numpy on diffusers' torch tensors
]


def load_script():
    spec = importlib.util.spec_from_file_location("scheduler_table", ROOT / "scripts" / "scheduler_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table = load_script()


def test_every_exported_scheduler_is_mapped():
    exported = table.exported_schedulers()
    assert len(exported) > 40  # diffusers' namespace was read, not an empty list
    assert table.unmapped(exported) == []
    # and the registry names only classes this diffusers exports (a renamed class would leave a stale entry)
    assert set(SUPPORTED_SCHEDULERS) | set(UNSUPPORTED_SCHEDULERS) <= set(exported)
    assert not set(SUPPORTED_SCHEDULERS) & set(UNSUPPORTED_SCHEDULERS)


def test_the_docs_table_is_the_generated_one():
    _, in_docs, _ = table._split(table.DOC.read_text())
    assert in_docs == table.generate(), "run: python scripts/scheduler_table.py --write"
    assert table.main(["--check"]) == 0


def test_an_unmapped_class_fails_the_check(monkeypatch):
    """What a diffusers upgrade adding a scheduler does: --check stops with the class named."""

    class BrandNewScheduler:
        pass

    monkeypatch.setattr(diffusers, "BrandNewScheduler", BrandNewScheduler, raising=False)
    assert "BrandNewScheduler" in table.exported_schedulers()
    with pytest.raises(SystemExit, match="BrandNewScheduler"):
        table.generate()


def test_a_stale_table_fails_the_check(tmp_path, monkeypatch, capsys):
    stale = table.DOC.read_text().replace("| `DDIMScheduler` | yes |", "| `DDIMScheduler` | no |")
    doc = tmp_path / "diffusers-schedulers.md"
    doc.write_text(stale)
    monkeypatch.setattr(table, "DOC", doc)
    assert table.main(["--check"]) == 1
    assert "-| `DDIMScheduler` | no |" in capsys.readouterr().out
    assert table.main(["--write"]) == 0 and table.main(["--check"]) == 0


def test_every_family_has_a_t_frac_rule_and_a_column():
    assert {spec.family for spec in SUPPORTED_SCHEDULERS.values()} <= set(T_FRAC_RULES) == set(table.T_FRAC)


REQUIRED = {  # constructor arguments without defaults
    "AmusedScheduler": {"mask_token_id": 0},
    "VQDiffusionScheduler": {"num_vec_classes": 8},
    "RFD4ProteinaScheduler": {"schedule_mode": "log", "noise_mode": "tan", "tsr_k": 1.0, "tsr_sigma": 1.0},
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_SCHEDULERS))
def test_refused_schedulers_say_why_at_apply_time(name):
    """Each refused class, built with its defaults, is refused by apply_patch with its reason (ScoreSdeVe, which
    has no step at all, included)."""
    scheduler = getattr(diffusers, name)(**REQUIRED.get(name, {}))
    with pytest.raises(ValueError, match=f"{name} is refused: "):
        apply_patch(scheduler, KDS(num_particles=2))
    assert "step" not in vars(scheduler)
