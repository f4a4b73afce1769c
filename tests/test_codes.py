"""ICD-10-CM normalisation and validation against the installed code set."""

from __future__ import annotations

import random
import re
import string
from importlib import metadata
from pathlib import Path

import pytest

from notecoder import codes


def _package_file(pattern: str) -> Path:
    dist = metadata.distribution("simple-icd-10-cm")
    found = [f for f in dist.files or [] if re.search(pattern, f.name)]
    assert len(found) == 1, f"{len(found)} files match {pattern}"
    return Path(found[0].locate())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("e119", "E11.9"),
        ("E11.9", "E11.9"),
        (" j45909 ", "J45.909"),
        ("I10", "I10"),
        ("i10", "I10"),
        ("E11.", "E11"),
        ("E1.19", "E11.9"),
        ("e11 .9", "E11.9"),
        ("\tS72.001a\n", "S72.001A"),
        ("s72001A", "S72.001A"),
        ("", ""),
        ("...", ""),
        ("R5", "R5"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert codes.normalise(raw) == expected


def test_normalise_is_idempotent() -> None:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + ". "
    for _ in range(500):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        once = codes.normalise(raw)
        assert codes.normalise(once) == once
        assert " " not in once and once.count(".") <= 1


def test_normalise_refuses_non_strings() -> None:
    with pytest.raises(TypeError, match="int"):
        codes.normalise(250)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("E11.9", (True, True)),  # subcategory, leaf
        ("E11", (True, False)),  # category with children
        ("I10", (True, True)),  # category that is itself billable
        ("J45.909", (True, True)),
        ("S72.001A", (True, True)),  # extended subcategory (7th character)
        ("S72.001", (True, False)),  # needs its 7th character
        ("T36.0X1A", (True, True)),  # placeholder X
        ("M1A.00X0", (True, True)),  # letter in the category
        ("B99", (True, False)),  # both a category and a one-category block
        ("e119", (True, True)),  # normalised before the lookup
        (" j45909 ", (True, True)),
        ("1", (False, False)),  # chapter
        ("22", (False, False)),  # chapter
        ("A00-A09", (False, False)),  # block
        ("E08-E13", (False, False)),  # block
        ("E11.99", (False, False)),  # well formed, not in the code set
        ("S02.0XX", (False, False)),  # cut short before its 7th character
        ("", (False, False)),
        ("XYZ", (False, False)),
    ],
)
def test_check(code: str, expected: tuple[bool, bool]) -> None:
    assert codes.check(code) == expected


@pytest.mark.parametrize(
    "garbage",
    [None, 5, 2.5, b"E11.9", ["E11.9"], {"code": "E11.9"}, "E11.9" * 50, "\x00", "é"],
)
def test_check_never_raises(garbage: object) -> None:
    assert codes.check(garbage) == (False, False)  # type: ignore[arg-type]


def test_check_never_raises_on_random_strings() -> None:
    rng = random.Random(11)
    alphabet = string.printable + "éß–"
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        valid, billable = codes.check(raw)
        assert valid or not billable


def test_check_is_cached() -> None:
    codes._check_cached.cache_clear()
    for _ in range(3):
        codes.check("K35.80")
    info = codes._check_cached.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_check_agrees_with_the_flat_code_list() -> None:
    # The package's flat list of every item (no dots) is a second source: a code is
    # billable exactly when no other code extends it, and chapters (digits) and blocks
    # (with a dash) are never valid.
    path = _package_file(r"^code-list-.*\.txt$")
    items = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    headings = [x for x in items if x.isdigit() or "-" in x]
    listed = sorted(x for x in items if not (x.isdigit() or "-" in x))
    leaf = {
        x: not (i + 1 < len(listed) and listed[i + 1].startswith(x))
        for i, x in enumerate(listed)
    }
    assert {codes.check(x) for x in headings} == {(False, False)}
    wrong = [x for x in listed if codes.check(x) != (True, leaf[x])]
    assert not wrong, f"{len(wrong)} codes disagree, first {wrong[:5]}"
    # CMS counts 74,719 billable codes in the FY2026 code set.
    assert sum(leaf.values()) == 74_719


def test_edition_names_the_installed_data() -> None:
    xml = _package_file(r"tabular.*\.xml$")
    with open(xml, encoding="utf-8") as handle:
        fiscal_year = re.search(r"<version>(\d{4})</version>", handle.read(1024))
    assert fiscal_year is not None
    version = metadata.version("simple-icd-10-cm")
    edition = codes.EDITION
    assert edition.startswith(f"ICD-10-CM FY{fiscal_year.group(1)}, ")
    assert edition.endswith(f"(simple-icd-10-cm {version})")
    # The pinned package (pyproject: simple-icd-10-cm==1.5.0) ships this release.
    if version == "1.5.0":
        pinned = "ICD-10-CM FY2026, April 1 2026 release (simple-icd-10-cm 1.5.0)"
        assert edition == pinned
