"""Fixtures shared by the torchbragg tests: the C program's reference images.

Two sources of references, both rendered by the C ``nanoBragg`` program:

* ``../shared/golden`` next to the checkout (every case, the 4096² tap
  configuration, noise images).  Tests that need it are skipped with a clear
  reason when it is absent.  ``TORCHBRAGG_GOLDEN=/path/to/golden`` points
  elsewhere.
* ``tests/data/golden_small`` in the repository: byte-identical copies of three
  small cases, so that a parity test always runs.

A test that takes the ``golden_case`` argument is run once per reference case:
every shared case when ``../shared/golden`` exists, otherwise the small copies.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
SHARED_GOLDEN = Path(os.environ.get("TORCHBRAGG_GOLDEN")
                     or Path(__file__).resolve().parents[2].parent / "shared" / "golden")
SMALL_GOLDEN = HERE.parent / "data" / "golden_small"
NO_SHARED = f"C reference images not found at {SHARED_GOLDEN} (../shared/golden next to the checkout)"

#: Files of a case folder that the C program read (copied next to the render).
INPUT_SUFFIXES = (".hkl", ".mat")


@dataclass
class GoldenCase:
    """One case rendered by the C program: its arguments, image and inputs."""

    name: str
    folder: Path
    entry: dict = field(repr=False)

    @property
    def args(self) -> list[str]:
        return list(self.entry["args"])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.entry["shape"])

    @property
    def note(self) -> str:
        return self.entry.get("note", "")

    def reference(self) -> np.ndarray:
        """The C float image, float64 ``[slow, fast]``."""
        raw = np.fromfile(self.folder / self.entry["float_image"], "<f4")
        return raw.reshape(self.shape).astype(np.float64)

    def log(self) -> str:
        return (self.folder / "log.txt").read_text()

    def input_files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix in INPUT_SUFFIXES)

    def stage(self, dest: Path, extra: Iterable[str] = ()) -> Path:
        """Copy the case's .hkl/.mat inputs (and ``extra`` file names) into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.input_files():
            shutil.copyfile(p, dest / p.name)
        for name in extra:
            shutil.copyfile(self.folder / name, dest / name)
        return dest

    def simulation(self, dest: Path, dtype=torch.float32, extra_args: Sequence[str] = (),
                   copy: Iterable[str] = (), chunk_rows: int | None = None):
        """A :class:`torchbragg.Simulation` of the case, inputs staged in ``dest``."""
        import torchbragg

        self.stage(dest, copy)
        return torchbragg.Simulation.from_args(self.args + list(extra_args), cwd=dest, dtype=dtype,
                                               chunk_rows=chunk_rows)

    def render(self, dest: Path, dtype=torch.float32, extra_args: Sequence[str] = (),
               copy: Iterable[str] = ()):
        """Render the case; returns ``(simulation, image as float64 numpy)``."""
        sim = self.simulation(dest, dtype, extra_args, copy)
        return sim, sim.render().detach().cpu().to(torch.float64).numpy()


def load_cases(root: Path) -> dict[str, GoldenCase]:
    """The cases of a golden folder (``cases.json`` + ``cases/<name>/``)."""
    index = root / "cases.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: GoldenCase(name, root / "cases" / name, entry) for name, entry in entries.items()}


def parity_metrics(out: np.ndarray, ref: np.ndarray) -> dict:
    """The golden-data comparison figures of an engine image against a C image."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    diff = np.abs(out - ref)
    return {
        "correlation": float(np.corrcoef(out.ravel(), ref.ravel())[0, 1]),
        "sum_ratio": float(out.sum() / ref.sum()),
        "max_rel": float(abs(out.max() / ref.max() - 1.0)),
        "worst_rel": float(diff.max() / ref.max()),
        "worst_pixel": tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)),
    }


def assert_parity(out: np.ndarray, ref: np.ndarray, dtype=torch.float32, label: str = "") -> dict:
    """Assert the golden acceptance criteria (and ~1e-6 agreement in float64)."""
    m = parity_metrics(out, ref)
    text = f"{label} [{str(dtype).replace('torch.', '')}]: {m}"
    assert m["correlation"] >= 0.9999, text
    assert abs(m["sum_ratio"] - 1.0) <= 1e-3, text
    assert m["max_rel"] <= 1e-3, text
    assert m["worst_rel"] < 1e-3, text
    if dtype == torch.float64:
        assert m["worst_rel"] < 1e-5, text
        assert abs(m["sum_ratio"] - 1.0) <= 1e-6, text
    return m


def _parametrised_cases() -> list[GoldenCase]:
    shared = load_cases(SHARED_GOLDEN)
    return list(shared.values()) if shared else list(load_cases(SMALL_GOLDEN).values())


def pytest_generate_tests(metafunc):
    if "golden_case" in metafunc.fixturenames:
        cases = _parametrised_cases()
        if cases:
            metafunc.parametrize("golden_case", cases, ids=[c.name for c in cases])
        else:  # pragma: no cover - the small copies are in the repository
            metafunc.parametrize("golden_case", [pytest.param(None, marks=pytest.mark.skip(reason=NO_SHARED))])


@pytest.fixture(scope="session")
def shared_golden() -> Path:
    """``../shared/golden`` (the test is skipped when it is absent)."""
    if not (SHARED_GOLDEN / "cases.json").is_file():
        pytest.skip(NO_SHARED)
    return SHARED_GOLDEN


@pytest.fixture(scope="session")
def shared_cases(shared_golden) -> dict[str, GoldenCase]:
    return load_cases(shared_golden)


@pytest.fixture(scope="session")
def small_cases() -> dict[str, GoldenCase]:
    cases = load_cases(SMALL_GOLDEN)
    assert cases, f"no small reference cases in {SMALL_GOLDEN}"
    return cases


@pytest.fixture(scope="session")
def reference_case(small_cases):
    """``reference_case(name)``: the shared case if present, else the small copy, else skip."""
    shared = load_cases(SHARED_GOLDEN)

    def get(name: str) -> GoldenCase:
        if name in shared:
            return shared[name]
        if name in small_cases:
            return small_cases[name]
        pytest.skip(f"case {name!r}: {NO_SHARED}")

    return get


@pytest.fixture(scope="session")
def parity():
    """``parity(out, ref, dtype, label)``: assert the golden acceptance criteria."""
    return assert_parity


@pytest.fixture
def needs_fast():
    """Skip where the fused CPU kernel cannot be compiled (no C++ compiler)."""
    from torchbragg.kernels.cpu import cpu_render_function

    if cpu_render_function(torch.float32, "square", False, False) is None:
        pytest.skip("the fused kernel could not be compiled here (no C++ compiler?)")
