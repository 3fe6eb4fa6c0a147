"""Shared pytest fixtures: where the Darknet reference data lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE_ENV = "DARKNETPY_REFERENCE"


def reference_path() -> Path:
    """The reference directory: ``$DARKNETPY_REFERENCE``, else ``<repo>/../shared/reference``."""
    env = os.environ.get(REFERENCE_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def missing_reference(message: str) -> None:
    """Reference data a test needs is missing: skip locally, fail in CI (``CI=true``)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_reference(path: Path) -> Path:
    """``path`` (a file or directory of the reference data); :func:`missing_reference`
    when it does not exist."""
    if not path.exists():
        missing_reference(f"{path} not in the reference data")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference data directory. Missing: skipped locally, a failure in CI (CI=true)."""
    path = reference_path()
    if not (path / "cases").is_dir():
        missing_reference(f"reference data not found at {path} (set {REFERENCE_ENV})")
    return path


def pytest_generate_tests(metafunc):
    """A test taking ``reference_case`` runs once per ``reference/cases/<name>``.

    With no cases found it still runs once (as ``no-cases``), so that ``reference_dir``
    can skip it locally or fail it in CI rather than pytest silently collecting nothing.
    """
    if "reference_case" in metafunc.fixturenames:
        cases = reference_path() / "cases"
        names = sorted(p.parent.name for p in cases.glob("*/case.json")) if cases.is_dir() else []
        metafunc.parametrize("reference_case", names or ["no-cases"])


def _build_synthetic(reference: Path, case: str, meta: dict, out_dir: Path) -> Path:
    """Rebuild a synthetic case's weights with the reference's own synth_weights.py and
    check the sha256 and size that case.json pins."""
    import hashlib
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("synth_weights", reference / "synth_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = meta["weights"]
    with open(reference / "cases" / case / w["layout"]) as f:
        data = module.synth_weights(json.load(f), w["seed"])
    assert hashlib.sha256(data).hexdigest() == w["sha256"], f"{case}: synthetic weights sha256"
    assert len(data) == w["bytes"], f"{case}: synthetic weights size"
    path = out_dir / f"{case}.weights"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def case_weights(reference_dir, tmp_path_factory):
    """``case_weights(name) -> Path`` of a case's weights: the real file from
    ``reference/weights``, or the synthetic one rebuilt (sha256-checked) once per session."""
    import json

    out_dir = tmp_path_factory.mktemp("synthetic-weights")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            with open(reference_dir / "cases" / case / "case.json") as f:
                meta = json.load(f)
            w = meta["weights"]
            built[case] = (_build_synthetic(reference_dir, case, meta, out_dir)
                           if w["synthetic"] else reference_dir / "weights" / w["file"])
        return built[case]

    return get
