"""kds_hook.k_diffusion_loader on fake k_diffusion packages: a complete install, and a --no-deps one whose
``__init__`` fails. Independent of the real k-diffusion (tests/test_k_diffusion.py covers that one)."""

from __future__ import annotations

import sys

import pytest

from kds_hook.k_diffusion_loader import load_k_diffusion

SUBMODULES = {
    "sampling.py": "from . import utils\nSAMPLER = 'sample_euler'\n",
    "external.py": "from . import sampling, utils\nWRAPPER = 'CompVisDenoiser'\n",
    "utils.py": "from torchvision.transforms import functional as TF\n",
}


@pytest.fixture
def fake_k_diffusion(tmp_path, monkeypatch):
    """Writes a k_diffusion package with the given ``__init__`` source into tmp_path and puts it first on
    sys.path; every k_diffusion and torchvision module is forgotten for the test and restored afterwards."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("k_diffusion", "torchvision")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(init_source: str, torchvision: bool):
        package = tmp_path / "k_diffusion"
        package.mkdir()
        (package / "__init__.py").write_text(init_source)
        for name, source in SUBMODULES.items():
            (package / name).write_text(source)
        if torchvision:  # a minimal importable torchvision.transforms.functional
            functional = tmp_path / "torchvision" / "transforms"
            functional.mkdir(parents=True)
            (tmp_path / "torchvision" / "__init__.py").write_text("")
            (functional / "__init__.py").write_text("")
            (functional / "functional.py").write_text("to_tensor = 'real'\n")
        return package

    yield write
    for name in [n for n in sys.modules if n.split(".")[0] in ("k_diffusion", "torchvision")]:
        del sys.modules[name]  # the fake ones; monkeypatch then restores the real ones


def test_a_complete_install_is_imported_as_is(fake_k_diffusion):
    package = fake_k_diffusion("from . import external, sampling, utils\nDenoiser = 'from __init__'\n", True)
    modules = load_k_diffusion()
    assert modules.complete
    assert sys.modules["k_diffusion"].Denoiser == "from __init__"  # the package's own __init__ ran
    assert modules.sampling.SAMPLER == "sample_euler" and modules.external.WRAPPER == "CompVisDenoiser"
    assert modules.sampling.__file__ == str(package / "sampling.py")
    assert sys.modules["k_diffusion.utils"].TF.to_tensor == "real"
    assert load_k_diffusion() == modules  # a second call returns the same modules


def test_a_no_deps_install_loads_the_samplers_without_its_init(fake_k_diffusion):
    # As k-diffusion 0.1.1.post1's __init__ without scikit-image: it fails on its first import.
    package = fake_k_diffusion("from skimage_not_installed import transform\n", False)
    modules = load_k_diffusion()
    assert not modules.complete
    assert not hasattr(sys.modules["k_diffusion"], "__file__")  # the bare package, not the __init__ module
    assert modules.sampling.__file__ == str(package / "sampling.py")
    assert modules.external.WRAPPER == "CompVisDenoiser"
    # The torchvision stand-in existed only while k_diffusion.utils imported, and says what it is when used.
    assert not [name for name in sys.modules if name.split(".")[0] == "torchvision"]
    with pytest.raises(AttributeError, match="stand-in"):
        sys.modules["k_diffusion.utils"].TF.to_pil_image
    assert load_k_diffusion() == modules


def test_a_no_deps_install_uses_a_real_torchvision_when_there_is_one(fake_k_diffusion):
    fake_k_diffusion("raise ImportError('No module named skimage')\n", True)
    modules = load_k_diffusion()
    assert not modules.complete
    assert sys.modules["k_diffusion.utils"].TF.to_tensor == "real"


def test_a_missing_sampler_dependency_leaves_nothing_half_loaded(fake_k_diffusion):
    package = fake_k_diffusion("raise ImportError('No module named skimage')\n", False)
    (package / "sampling.py").write_text("import torchsde_not_installed\n")
    with pytest.raises(ModuleNotFoundError, match="torchsde_not_installed"):
        load_k_diffusion()
    assert not [name for name in sys.modules if name.split(".")[0] in ("k_diffusion", "torchvision")]
    (package / "sampling.py").write_text(SUBMODULES["sampling.py"])  # installed now: a later call succeeds
    assert load_k_diffusion().sampling.SAMPLER == "sample_euler"
