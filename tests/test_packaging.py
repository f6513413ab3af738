"""pyproject.toml: every dependency bounded, and the bounds admit what the code and config use."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    deps = PROJECT["project"]["dependencies"] + PROJECT["project"]["optional-dependencies"]["dev"]
    return [Requirement(dep) for dep in deps]


def _by_name() -> dict[str, Requirement]:
    return {req.name.lower(): req for req in _requirements()}


def _lower_bound(req: Requirement) -> Version:
    lows = [Version(spec.version) for spec in req.specifier if spec.operator in (">=", "==", "~=")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def test_every_dependency_has_a_lower_and_an_upper_bound_and_the_venv_satisfies_them() -> None:
    for req in _requirements():
        operators = {spec.operator for spec in req.specifier}
        assert operators & {">=", "==", "~="}, f"{req}: no lower bound"
        assert operators & {"<", "==", "~="}, f"{req}: no upper bound"
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req} excludes the installed {installed}"


def test_lower_bounds_support_the_features_in_use() -> None:
    deps = _by_name()
    # asyncio_default_test_loop_scope (our ini) exists from pytest-asyncio 0.26.
    assert "asyncio_default_test_loop_scope" in PROJECT["tool"]["pytest"]["ini_options"]
    assert _lower_bound(deps["pytest-asyncio"]) >= Version("0.26")
    # The asyncio RedisStorage's implementation="redispy" exists from limits 4.2.
    assert 'implementation="redispy"' in (ROOT / "data_plane" / "limits.py").read_text()
    assert _lower_bound(deps["limits"]) >= Version("4.2")


# Imported directly but part of a declared framework's own API (FastAPI is built
# on Starlette and AnyIO and bounds them itself).
FRAMEWORK_MODULES = {"starlette": "fastapi", "anyio": "fastapi"}


def _third_party_imports(package: str) -> set[str]:
    """Top-level modules imported at module level (lazy imports in functions are optional features)."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    local = {"control_plane", "data_plane", "infra", "migrations", "tests"}
    return {name for name in found - local if name not in sys.stdlib_module_names and name != "__future__"}


def _modules_of(requirements: list[str]) -> set[str]:
    names = {canonicalize_name(Requirement(dep).name) for dep in requirements}
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if names & {canonicalize_name(dist) for dist in dists}
    }


def test_every_runtime_import_is_a_declared_runtime_dependency() -> None:
    provided = _modules_of(PROJECT["project"]["dependencies"]) | set(FRAMEWORK_MODULES)
    for module, framework in FRAMEWORK_MODULES.items():
        assert any(canonicalize_name(Requirement(r).name) == module for r in metadata.requires(framework) or [])
    for package in ("control_plane", "data_plane", "infra"):
        missing = _third_party_imports(package) - provided
        assert not missing, f"{package} imports undeclared distributions: {sorted(missing)}"
    # Optional features import lazily and come with an extra.
    assert "boto3" in _modules_of(PROJECT["project"]["optional-dependencies"]["aws"])
