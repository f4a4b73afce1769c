"""ICD-10-CM codes: normalise what a model wrote, then check it.

The code set is the one the pinned ``simple-icd-10-cm`` package ships;
``EDITION`` names it for the audit trail. The package parses its 10 MB tabular
XML when imported (about 1.5 s), so it is loaded on the first :func:`check`, not
with this module: ``notecoder --help`` and archive planning never pay for it.
"""

from __future__ import annotations

import functools
import re
import warnings
from importlib import metadata
from types import ModuleType

# The longest ICD-10-CM code is 8 characters with its dot ("S72.001A"). Anything
# much longer is garbage; it is rejected before the cache so it cannot fill it.
_LONGEST_PLAUSIBLE = 16

_TABULAR_FILE = re.compile(r"tabular-([A-Za-z]+)-(\d{1,2})-(\d{4})\.xml$")
_XML_VERSION = re.compile(r"<version>\s*(\d{4})\s*</version>")


def normalise(raw: str) -> str:
    """Return ``raw`` upper-cased, with its one dot after the 3rd character.

    Whitespace (around and inside) and every dot are dropped first, so "e119",
    "E11.9" and " e11 .9 " all give "E11.9"; 3 characters or fewer get no dot
    ("I10"). Pure: no lookup in the code set (that is :func:`check`).
    """
    if not isinstance(raw, str):
        raise TypeError(f"an ICD-10 code must be a str, not {type(raw).__name__}")
    bare = "".join(raw.split()).replace(".", "").upper()
    if len(bare) <= 3:
        return bare
    return f"{bare[:3]}.{bare[3:]}"


def check(code: str) -> tuple[bool, bool]:
    """Return ``(valid, billable)`` for ``code`` in the installed edition.

    ``code`` is normalised first. Valid means a category, subcategory or
    extended subcategory (with a 7th character); chapters ("1") and blocks
    ("A00-A09") are headings, not codes, so they are invalid. Billable means
    valid and a leaf of the tabular list: a code a claim can carry. Never
    raises: anything but a plausible code string gives ``(False, False)``.
    Results are cached per distinct input.
    """
    if not isinstance(code, str) or len(code) > _LONGEST_PLAUSIBLE:
        return False, False
    return _check_cached(code)


@functools.lru_cache(maxsize=1 << 17)
def _check_cached(code: str) -> tuple[bool, bool]:
    # 2**17 entries hold every ICD-10-CM item (about 98,000) plus the common
    # spellings of them that a model writes, while keeping a run of garbage
    # bounded in memory.
    icd = _code_set()
    normal = normalise(code)
    if not icd.is_category_or_subcategory(normal):
        return False, False
    return True, bool(icd.is_leaf(normal))


@functools.cache
def _code_set() -> ModuleType:
    with warnings.catch_warnings():
        # simple-icd-10-cm 1.5.0 reads its data through importlib.resources
        # calls that Python 3.11 deprecated; the warning is the package's, not
        # ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm

    return simple_icd_10_cm


def _edition() -> str:
    """Name the edition from the package's metadata and data files.

    Reads them without importing the package. The tabular XML's ``<version>``
    is the fiscal year and its file name the release date (CMS publishes an
    October release and, some years, an April update).
    """
    dist = metadata.distribution("simple-icd-10-cm")
    package = f"simple-icd-10-cm {dist.version}"
    for file in dist.files or []:
        name = _TABULAR_FILE.search(file.name)
        if name is None:
            continue
        with open(file.locate(), encoding="utf-8") as xml:
            version = _XML_VERSION.search(xml.read(1024))
        year = f"FY{version.group(1)}" if version else "fiscal year unknown"
        month, day, release_year = name.groups()
        release = f"{month} {day} {release_year} release"
        return f"ICD-10-CM {year}, {release} ({package})"
    return f"ICD-10-CM, release unknown ({package})"


EDITION: str = _edition()
"""The ICD-10-CM edition :func:`check` validates against, for the audit trail."""
