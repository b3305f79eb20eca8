"""The shape of the code: one source for each piece, native kernels as their own files,
no private names across modules, and the kernel cache's housekeeping."""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

import torchbragg
from torchbragg.io import images
from torchbragg.kernels import build, cpu, packing
from torchbragg.kernels.reasons import LOOKUP_DESCRIPTIONS, LOOKUP_REASONS

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("src", "inspector", "scripts") for p in (ROOT / folder).rglob("*.py")]
ENGINE = ROOT / "src" / "torchbragg"
INSPECTOR = ROOT / "inspector" / "bragg_inspector"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _string_constants(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(_text(path))) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


# --------------------------------------------------------------------------- native sources are files
NATIVE_MARKS = re.compile(r'#include\s*[<"]|extern\s+"C"|__global__|__device__|\bstatic\s+inline\b|#define\s+\w+')


def test_no_c_cpp_or_cuda_text_lives_in_a_python_file():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in SOURCES for s in _string_constants(p)
             for m in [NATIVE_MARKS.search(s)] if m]
    assert found == []


def test_the_kernels_are_real_files_that_include_the_one_header():
    kdir = ENGINE / "kernels"
    for name in ("cpu_render.cpp", "gpu_render.cu"):
        text = _text(kdir / name)
        assert '#include "kernel_math.h"' in text, name
        assert "@include" not in text
    math_h = _text(kdir / "kernel_math.h")
    # the per-evaluation physics lives in the header, once: both kernels call it, neither repeats it
    for fn in ("tb_lattice_factor", "tb_lookup", "tb_intensity", "tb_accumulate", "tb_pixel_value"):
        assert re.search(rf"\b{fn}\s*\(", math_h), fn
        for name in ("cpu_render.cpp", "gpu_render.cu"):
            text = _text(kdir / name)
            assert re.search(rf"\b{fn}\s*\(", text), (fn, name)
            assert not re.search(rf"^\s*(static\s+)?(inline\s+)?\w[\w\s\*&]*\b{fn}\s*\([^;]*\)\s*\{{", text,
                                 re.MULTILINE), f"{name} defines {fn} again"
    # C's tophat/gauss constants: only in the header
    for name in ("cpu_render.cpp", "gpu_render.cu"):
        assert "0.3969" not in _text(kdir / name)
    assert "0.3969" in math_h


def test_the_source_hash_covers_the_header(tmp_path, monkeypatch):
    src = cpu.cpu_source(torch.float32, "square", False, False, False, 0)
    before = src.text_hash()
    assert src.with_text(src.text()).text_hash() == before
    assert src.with_text(src.text() + "\n// edit\n").text_hash() != before
    fake = tmp_path / "kernels"
    fake.mkdir()
    for p in (ENGINE / "kernels").glob("*.[ch]*"):
        (fake / p.name).write_text(_text(p))
    monkeypatch.setattr(build, "KERNEL_DIR", fake)
    assert src.text_hash() == before
    (fake / "kernel_math.h").write_text(_text(fake / "kernel_math.h") + "\n// a header edit\n")
    assert src.text_hash() != before  # a header edit makes a new build


@pytest.mark.skipif(build.cxx_compiler() is None, reason="no C++ compiler")
def test_compiler_errors_name_the_cpp_file_and_line(tmp_path):
    src = cpu.cpu_source(torch.float64, "square", False, False, False, 0)
    lines = src.text().splitlines()
    target = next(i for i, ln in enumerate(lines) if ln.startswith('#include "kernel_math.h"')) + 1
    lines.insert(target, "static const int broken = not_a_name;")
    with pytest.raises(RuntimeError) as err:
        build.compile_shared_library(build.cxx_compiler(), (cpu.CXX_FLAGS,), src.with_text("\n".join(lines)),
                                     str(tmp_path / "broken.so"))
    assert re.search(rf"cpu_render\.cpp:{target + 1}:\d+: error: .*not_a_name", str(err.value)), str(err.value)


def test_the_cache_prunes_builds_no_current_source_can_produce(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHBRAGG_CACHE_DIR", str(tmp_path))
    src = cpu.cpu_source(torch.float32, "square", False, False, False, 0)
    current = src.text_hash()
    old = time.time() - 2 * build.PRUNE_MIN_AGE_S
    files = {
        "kept current": f"tb_render_{current}-{'0' * 16}.so",
        "other text": f"tb_render_{'a' * 12}-{'1' * 16}.so",
        "earlier naming": f"tb_render_{'b' * 20}.so",
        "left temporary": ".tb_x1y2z3.so",
        "other kind": f"tb_gpu_{'c' * 12}-{'2' * 16}.bin",
        "someone else's": "notes.txt",
    }
    for name in files.values():
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old - 86400, old - 86400))
    young = tmp_path / f"tb_render_{'d' * 12}-{'3' * 16}.so"  # another version may be loading it right now
    young.write_text("x")
    removed = {p.name for p in build.prune_kernel_cache("tb_render_", current, ".so")}
    assert removed == {files["other text"], files["earlier naming"], files["left temporary"]}
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {files["kept current"], files["other kind"], files["someone else's"], young.name}


# --------------------------------------------------------------------------- one home for each table
def test_one_definition_of_the_lookup_reasons():
    names = list(LOOKUP_REASONS.values())
    holders = [p.relative_to(ROOT).as_posix() for p in SOURCES
               if all(n in _string_constants(p) for n in names)]
    assert holders == ["src/torchbragg/kernels/reasons.py"]
    for text in LOOKUP_DESCRIPTIONS.values():
        assert [p.name for p in SOURCES if text in _string_constants(p)] == ["reasons.py"], text


def test_one_definition_of_the_image_suffixes():
    holders = [p.relative_to(ROOT).as_posix() for p in SOURCES if ".raw" in _string_constants(p)]
    assert holders == ["src/torchbragg/io/images.py"]
    assert set(images.IMAGE_SUFFIXES) == set(images.SMV_SUFFIXES) | set(images.RAW_SUFFIXES)
    # the manifest napari reads cannot import Python: it must say the same, in both cases
    manifest = yaml.safe_load(_text(INSPECTOR / "napari.yaml"))
    reader = next(r for r in manifest["contributions"]["readers"] if "*.img" in r["filename_patterns"])
    want = [f"*{s}" for s in images.IMAGE_SUFFIXES] + [f"*{s.upper()}" for s in images.IMAGE_SUFFIXES]
    assert sorted(reader["filename_patterns"]) == sorted(want)
    from bragg_inspector import _engine

    smv, raw = _engine.image_suffixes()
    assert (smv, raw) == (tuple(images.SMV_SUFFIXES), tuple(images.RAW_SUFFIXES))


def test_one_definition_of_the_tap_configuration():
    want = list(torchbragg.TAP_CONFIG_ARGS)
    size_at = want.index("-detpixels") + 1

    def is_copy(node) -> bool:  # the same words, whatever the detector size
        if not isinstance(node, ast.List | ast.Tuple):
            return False
        words = [getattr(e, "value", None) for e in node.elts]
        return len(words) >= size_at and words[:size_at] == want[:size_at]

    holders = [p.relative_to(ROOT).as_posix() for p in SOURCES
               if any(is_copy(n) for n in ast.walk(ast.parse(_text(p))))]
    assert holders == ["src/torchbragg/config.py"]
    from bragg_inspector import _engine

    assert _engine.tap_config_args() == want  # the inspector reads it, without importing torch


# --------------------------------------------------------------------------- names and modules
def _private_imports(path: Path) -> list[str]:
    """``from x import _name`` and ``module._name`` of another module (the package's own
    private modules, such as the inspector's ``_engine`` and ``_qt``, are allowed)."""
    import sys

    tree = ast.parse(_text(path))
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
               for a in n.names if a.name.split(".")[0] not in sys.stdlib_module_names}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name.startswith("_") and not a.name.startswith("__") and a.name not in ("_engine", "_qt"):
                    out.append(f"{path.name}:{n.lineno} from {n.module} import {a.name}")
        elif (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
              and isinstance(n.value, ast.Name) and n.value.id in modules):
            out.append(f"{path.name}:{n.lineno} {n.value.id}.{n.attr}")
    return out


def test_no_private_names_are_imported_across_modules():
    found = [f for p in list(ENGINE.rglob("*.py")) + list(INSPECTOR.rglob("*.py")) for f in _private_imports(p)]
    assert found == []


def test_compiled_kernel_plans_share_one_parameter_packing():
    from torchbragg.kernels.gpu import GpuPlan

    assert issubclass(cpu.CpuPlan, packing.KernelParameters) and issubclass(GpuPlan, packing.KernelParameters)
    assert packing.compiled_kernels_unsupported is torchbragg.kernels.compiled_kernels_unsupported


def test_public_names_work_from_the_package():
    import torchbragg.cli
    import torchbragg.io
    import torchbragg.kernels

    for name in torchbragg.__all__:
        assert getattr(torchbragg, name) is not None, name
    assert len(torchbragg.__all__) == len(set(torchbragg.__all__))
    for sub in (torchbragg.io, torchbragg.kernels, torchbragg.cli):
        for name in getattr(sub, "__all__", []):
            assert hasattr(sub, name), (sub.__name__, name)


def test_the_engine_spec_names_every_module():
    spec = _text(ROOT / "specs" / "engine.md")
    modules = [p.relative_to(ENGINE).as_posix() for p in ENGINE.rglob("*")
               if p.suffix in (".py", ".cpp", ".cu", ".h") and p.name != "__init__.py"]
    missing = [m for m in modules if m not in spec and Path(m).name not in spec]
    assert missing == []
    assert not (ENGINE / "setup.py").exists() and not (ENGINE / "kernel.py").exists()


def _is_exception(node: ast.ClassDef) -> bool:
    return any(getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception", "Warning", "Cancelled"))
               for b in node.bases)


def _numpydoc_gaps(node: ast.FunctionDef | ast.ClassDef) -> list[str]:
    """The numpydoc sections a public function or class lacks."""
    doc = ast.get_docstring(node) or ""
    if not doc:
        return ["docstring"]
    if isinstance(node, ast.ClassDef):
        if _is_exception(node):
            return []
        return [] if re.search(r"^(Parameters|Attributes)\n-+$", doc, re.M) else ["Parameters/Attributes"]
    gaps = []
    every = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    args = [a.arg for a in every if a.arg not in ("self", "cls")]
    if (args or node.args.vararg or node.args.kwarg) and not re.search(r"^Parameters\n-+$", doc, re.M):
        gaps.append("Parameters")
    nested = {id(n) for d in ast.walk(node) if d is not node and isinstance(d, ast.FunctionDef | ast.Lambda)
              for n in ast.walk(d)}
    returns = any(isinstance(n, ast.Return) and n.value is not None and id(n) not in nested for n in ast.walk(node))
    if returns and not re.search(r"^(Returns|Yields)\n-+$", doc, re.M):
        gaps.append("Returns")
    return gaps


def test_every_module_says_what_it_exports():
    missing = [p.relative_to(ROOT).as_posix() for p in list(ENGINE.rglob("*.py")) + list(INSPECTOR.rglob("*.py"))
               if p.name != "__main__.py" and "__all__" not in _text(p)]
    assert missing == []


def test_every_public_function_and_class_has_numpydoc_sections():
    """Each name in a module's __all__: a docstring, Parameters for its arguments, Returns for its value."""
    gaps = []
    for p in list(ENGINE.rglob("*.py")) + list(INSPECTOR.rglob("*.py")):
        tree = ast.parse(_text(p))
        names = set()
        for n in tree.body:
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets):
                names = {getattr(e, "value", None) for e in n.value.elts}
        for n in tree.body:
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names:
                gaps += [f"{p.relative_to(ROOT)}:{n.lineno} {n.name}: {g}" for g in _numpydoc_gaps(n)]
    assert gaps == []
