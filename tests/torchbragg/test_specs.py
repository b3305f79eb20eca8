"""The specs in ``specs/`` against the code they describe.

* ``specs/engine.md`` holds the nearest-neighbour rule between its marker
  lines, and ``torchbragg.tap_audit.nearest_neighbour_rule()`` (which the HKL
  audit quotes) returns exactly that text;
* every flag the parser knows is documented, and the flag tables of
  ``specs/cli.md`` name no flag the parser does not know;
* ``specs/tap_schema.json`` is a valid JSON Schema and real taps of every tap
  id validate against it;
* relative links between the spec files point at files and headings that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from torchbragg import Simulation
from torchbragg.arguments import ENGINE_FLAGS, FLAGS
from torchbragg.kernels import LOOKUP_REASONS
from torchbragg.tap_audit import nearest_neighbour_rule
from torchbragg.taps import TAP_NAMES

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
ENGINE_MD = SPECS / "engine.md"
CLI_MD = SPECS / "cli.md"
SCHEMA = SPECS / "tap_schema.json"
START = "<!-- rule:nearest-neighbour -->"
END = "<!-- /rule:nearest-neighbour -->"

SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-N", "5", "-lambda", "1.0",
         "-distance", "100", "-pixel", "0.4", "-detpixels", "32", "-oversample", "2"]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rule_block() -> str:
    text = _text(ENGINE_MD)
    assert text.count(START) == 1, f"{ENGINE_MD} must contain the line {START} exactly once"
    assert text.count(END) == 1, f"{ENGINE_MD} must contain the line {END} exactly once"
    assert text.index(START) < text.index(END), "rule markers are in the wrong order"
    lines = text.splitlines()
    assert START in [line.strip() for line in lines] and END in [line.strip() for line in lines], \
        "the rule markers must stand on lines of their own"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def _plain(text: str) -> str:
    """Markdown-free, ASCII-minus, single-spaced text for phrase checks."""
    text = text.replace("\u2212", "-").replace("`", "").replace("*", "")
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------- rule block
def test_rule_block_exists_and_states_the_rule():
    rule = _plain(_rule_block())
    assert "ceil(h - 0.5)" in rule
    assert "ceil(k - 0.5)" in rule and "ceil(l - 0.5)" in rule
    assert "default_F" in rule
    assert "out_of_bounds" in rule and "oob" in rule
    assert "pre-filled" in rule, "the rule must say the table's box is pre-filled with default_F"
    for bound in ("h_min", "h_max", "k_min", "k_max", "l_min", "l_max"):
        assert bound in rule
    for reason in LOOKUP_REASONS.values():
        assert reason in rule, f"lookup reason {reason!r} missing from the rule block"


def test_audit_quotes_the_rule_block():
    got = nearest_neighbour_rule()
    text, source = got if isinstance(got, tuple) else (got, None)
    assert text.strip() == _rule_block()
    if source is not None:
        assert Path(source).resolve() == ENGINE_MD.resolve()


def test_tap_rule_string_agrees_with_the_spec():
    sim = Simulation.from_args(SMALL + ["-default_F", "100"], dtype=torch.float64)
    line = _plain(sim.tap(16, 16).to_json("hkl_subpixel")["values"]["nearest_neighbour_rule"])
    assert "ceil(h - 0.5)" in line and "default_F" in line


# ---------------------------------------------------------------- flags
def _mentions(text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def test_every_flag_is_documented():
    both = _text(ENGINE_MD) + "\n" + _text(CLI_MD)
    missing = [f for f in list(FLAGS) + list(ENGINE_FLAGS) if not _mentions(both, f)]
    assert not missing, f"flags not mentioned in specs/engine.md or specs/cli.md: {missing}"


def _cli_flag_tables() -> list:
    """First cells of the table rows in cli.md's flag sections (§1.1 and §2)."""
    text = _text(CLI_MD)
    start = text.index("### 1.1 Engine options")
    end = text.index("## 3. ")
    rows = [line for line in text[start:end].splitlines() if line.startswith("| `-")]
    return [row.split("|")[1] for row in rows]


def test_every_flag_has_a_row_in_the_cli_tables():
    cells = "\n".join(_cli_flag_tables())
    missing = [f for f in list(FLAGS) + list(ENGINE_FLAGS) if not _mentions(cells, f)]
    assert not missing, f"flags without a row in the flag tables of specs/cli.md: {missing}"


def test_cli_tables_name_only_real_flags():
    known = set(FLAGS) | set(ENGINE_FLAGS)
    named = set()
    for cell in _cli_flag_tables():
        for code in re.findall(r"`([^`]*)`", cell):
            named.update(tok for tok in code.split() if tok.startswith("-"))
    assert named, "no flags found in the cli.md tables"
    unknown = sorted(named - known)
    assert not unknown, f"specs/cli.md documents flags the parser does not know: {unknown}"


# ---------------------------------------------------------------- tap schema
@pytest.fixture(scope="module")
def validator():
    schema = json.loads(_text(SCHEMA))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_valid_and_matches_the_code(validator):
    props = validator.schema["properties"]
    assert set(props["tap_id"]["enum"]) == set(TAP_NAMES)
    hkl = validator.schema["allOf"][0]["then"]["properties"]["values"]
    lookup = hkl["properties"]["subpixels"]["items"]["properties"]["lookup"]["enum"]
    assert set(lookup) == set(LOOKUP_REASONS.values())


@pytest.fixture(scope="module")
def hkl_folder(tmp_path_factory):
    """An HKL table with a hole: (0,0,1) is inside the box but not listed."""
    folder = tmp_path_factory.mktemp("spec_hkl")
    lines = [f"{h} {k} {l} {10 + h + k + l}" for h in (-1, 0, 1) for k in (-1, 0, 1) for l in (-1, 0, 1)
             if (h, k, l) != (0, 0, 1)]
    (folder / "holes.hkl").write_text("\n".join(lines) + "\n")
    return folder


CONFIGS = {
    "no_table": (SMALL + ["-default_F", "100"], None),
    "table_with_holes": (SMALL + ["-hkl", "holes.hkl", "-default_F", "7", "-nointerpolate"], "hkl"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_taps_validate_for_every_tap_id(validator, hkl_folder, name):
    args, needs = CONFIGS[name]
    sim = Simulation.from_args(args, dtype=torch.float64, cwd=hkl_folder if needs else None)
    image = sim.render()
    for slow, fast in ((0, 0), (16, 16), (31, 5)):
        tap = sim.tap(slow, fast, taps=TAP_NAMES)
        for tap_id in TAP_NAMES:
            doc = tap.to_json(tap_id)
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, (f"{name} pixel ({slow},{fast}) tap {tap_id}: "
                                + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5]))
            json.dumps(doc, allow_nan=False)  # plain JSON numbers only
            assert doc["pixel_coords"] == [slow, fast]
        assert tap.final_intensity == pytest.approx(float(image[slow, fast]), rel=1e-9, abs=0.0)


def test_out_of_bounds_follows_the_rule(hkl_folder):
    """out_of_bounds is true exactly for no table / outside the box, as the rule says."""
    sim = Simulation.from_args(CONFIGS["table_with_holes"][0], dtype=torch.float64, cwd=hkl_folder)
    seen = set()
    for slow, fast in ((16, 16), (0, 0), (16, 0), (8, 24)):
        for row in sim.tap(slow, fast).to_json("hkl_subpixel")["values"]["subpixels"]:
            h0, k0, l0 = row["hkl_rounded"]
            inside = all(-1 <= i <= 1 for i in (h0, k0, l0))
            assert row["out_of_bounds"] == (not inside)
            if not inside:
                assert row["lookup"] == "default_F:outside_table" and row["F_cell"] == 7.0
            elif (h0, k0, l0) == (0, 0, 1):
                assert row["lookup"] == "default_F:unlisted" and row["F_cell"] == 7.0
            else:
                assert row["lookup"] == "table" and row["F_cell"] == 10 + h0 + k0 + l0
            seen.add(row["lookup"])
    assert "table" in seen and "default_F:outside_table" in seen
    sim = Simulation.from_args(CONFIGS["no_table"][0], dtype=torch.float64)
    for row in sim.tap(16, 16).to_json("hkl_subpixel")["values"]["subpixels"]:
        assert row["out_of_bounds"] and row["lookup"] == "default_F:no_table" and row["F_cell"] == 100.0


# ---------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", _text(path), re.M)}


@pytest.mark.parametrize("name", ["README.md", "engine.md", "cli.md"])
def test_relative_links_resolve(name):
    path = SPECS / name
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(path)):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part) if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"broken links in specs/{name}: " + "; ".join(bad)
