"""Naming a recipe (train/recipe.py `find_recipe`): the recipes ship inside the package, so `recipes/cpu/encoder.yaml`,
`cpu/encoder.yaml` and `cpu/encoder` name them from any directory; a file that exists is read first;
TWINLM_RECIPES replaces the shipped folder (for names and for the suite). A wheel built from the repository
carries every recipe, and an install of it finds them (slow)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import twinlm
from twinlm.errors import MissingArtifactError
from twinlm.suite.pipeline import Suite
from twinlm.suite.scales import get_scale
from twinlm.train.recipe import find_recipe, load_raw, load_recipe, recipes_dir, shipped_recipes

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(shipped_recipes()).as_posix() for p in shipped_recipes().rglob("*.yaml"))


def own_recipe(path: Path, lr: float) -> Path:
    """A recipe file on top of the shipped cpu encoder, told apart by its learning rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"base: {shipped_recipes() / 'cpu' / 'encoder.yaml'}\noptim:\n  lr: {lr}\n")
    return path


def test_the_recipes_are_package_data_named_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINLM_RECIPES", raising=False)
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    package = Path(twinlm.__file__).resolve().parent
    assert shipped_recipes() == recipes_dir() == package / "recipes"
    assert "cpu/encoder.yaml" in SHIPPED and "ettin/150m/decoder.yaml" in SHIPPED and len(SHIPPED) >= 30
    encoder = package / "recipes" / "cpu" / "encoder.yaml"
    for name in ["recipes/cpu/encoder.yaml", "cpu/encoder.yaml", "cpu/encoder", Path("recipes/cpu/encoder.yaml")]:
        assert find_recipe(name) == encoder
    r = load_recipe("recipes/cross/17m/enc-from-dec.yaml", ["optim.lr=1e-3"])  # its base files found beside it
    assert r.name == "ettin-17m-enc-from-dec" and r.objective == "mntp" and r.optim.lr == 1e-3


def test_an_existing_file_comes_first_and_a_missing_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINLM_RECIPES", raising=False)
    monkeypatch.chdir(tmp_path)
    own_recipe(tmp_path / "recipes" / "cpu" / "encoder.yaml", 0.123)
    assert load_recipe("recipes/cpu/encoder.yaml").optim.lr == 0.123  # the user's copy, not the shipped one
    assert load_recipe("cpu/encoder").optim.lr != 0.123
    with pytest.raises(MissingArtifactError, match=r"recipe cpu/encodr not found: .*the shipped recipes.*did you "
                                                   r"mean cpu/encoder"):
        find_recipe("cpu/encodr")
    with pytest.raises(MissingArtifactError, match="recipe /nowhere/encoder.yaml not found"):
        find_recipe("/nowhere/encoder.yaml")


def test_twinlm_recipes_replaces_the_shipped_folder_for_names_and_the_suite(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    own_recipe(mine / "cpu" / "encoder.yaml", 0.456)
    monkeypatch.setenv("TWINLM_RECIPES", str(mine))
    monkeypatch.chdir(tmp_path)
    assert recipes_dir() == mine
    assert load_recipe("recipes/cpu/encoder.yaml").optim.lr == 0.456
    assert Suite(tmp_path / "suite", get_scale("quick")).recipes == mine
    with pytest.raises(MissingArtifactError, match=rf"ettin/17m/encoder not found: .*in {mine} "
                                                   rf"\(TWINLM_RECIPES={mine}\)"):
        find_recipe("ettin/17m/encoder")  # shipped, but TWINLM_RECIPES replaces the shipped folder
    monkeypatch.setenv("TWINLM_RECIPES", str(tmp_path / "none"))
    with pytest.raises(MissingArtifactError, match=r"TWINLM_RECIPES=.*none is not a folder: .*or unset it"):
        find_recipe("cpu/encoder")


@pytest.mark.slow
def test_a_wheel_carries_every_recipe_and_its_install_finds_them(tmp_path):
    """`pip wheel` of the repository's project files (a copy: the build leaves build/ and egg-info beside them;
    setuptools from this environment, no download), installed into a folder of its own: the wheel holds each
    shipped recipe, and the installed twinlm names them from another directory."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(project)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("twinlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.removeprefix("twinlm/recipes/") for n in names if n.startswith("twinlm/recipes/")) == SHIPPED
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import twinlm; from twinlm.train.recipe import find_recipe, load_recipe; "
            "print(twinlm.__file__); print(find_recipe('recipes/cpu/encoder.yaml')); "
            "print(load_recipe('ettin/150m/decoder').objective)")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    module, encoder, objective = run.stdout.split()
    site = tmp_path / "site" / "twinlm"
    assert Path(module) == site / "__init__.py"
    assert Path(encoder) == site / "recipes" / "cpu" / "encoder.yaml" and objective == "clm"


def test_a_recipe_of_your_own_bases_on_a_shipped_one_by_name(tmp_path, monkeypatch):
    """`base:` is read beside the recipe first, else as a recipe name (the shipped recipes or TWINLM_RECIPES),
    with the checkout-relative `../recipes/…` form naming the same recipe; neither: one line naming both places."""
    monkeypatch.delenv("TWINLM_RECIPES", raising=False)
    monkeypatch.chdir(tmp_path)
    shipped = load_recipe("ettin/17m/encoder")
    for base in ["[ettin/base, ettin/17m/size]", "[../recipes/ettin/base.yaml, recipes/ettin/17m/size.yaml]"]:
        mine = tmp_path / "mine" / "encoder.yaml"
        mine.parent.mkdir(exist_ok=True)
        mine.write_text(f"base: {base}\nname: mine\nobjective: mlm\noptim:\n  lr: 0.321\n")
        r = load_recipe(mine)
        assert (r.name, r.optim.lr) == ("mine", 0.321)
        assert (r.model, r.phases, r.optim.weight_decay) == (shipped.model, shipped.phases, shipped.optim.weight_decay)
    # a file beside the recipe wins over the shipped recipe of the same name
    (tmp_path / "mine" / "ettin").mkdir()
    (tmp_path / "mine" / "ettin" / "base.yaml").write_text("optim:\n  eps: 0.777\n")
    mine.write_text("base: [ettin/base.yaml, ettin/17m/size]\nobjective: mlm\n")
    assert load_raw(mine)["optim"]["eps"] == 0.777
    mine.write_text("base: ettin/bsae\n")
    with pytest.raises(MissingArtifactError, match=r"base 'ettin/bsae' not found: neither .*mine/ettin/bsae "
                                                   r"\(beside the recipe\) nor a recipe of that name in .*recipes "
                                                   r"\(the shipped recipes\)"):
        load_recipe(mine)
    # TWINLM_RECIPES replaces the shipped folder for bases too
    monkeypatch.setenv("TWINLM_RECIPES", str(tmp_path / "mine"))
    mine.write_text("base: recipes/ettin/base\nobjective: mlm\n")
    assert load_raw(mine)["optim"]["eps"] == 0.777
