"""MONAI model-zoo's conventions for a bundle's files, checked on every bundle: ``docs/data_license.txt`` (the zoo's
CONTRIBUTING: the license conditions of the data a bundle uses) and ``docs/README.md`` with the sections of the zoo's
bundle READMEs, in their order. File checks only; ``benchmarks/zoo_verify.py`` runs the zoo's own verifier."""

import re

import pytest
from helpers import BUNDLES

from medssl.bundle import BUNDLE_NAMES

# The headings of the zoo's bundle READMEs (spleen_ct_segmentation and most others), in order; a README may have more
# sections between them (ours: Limitations, before References).
README_SECTIONS = [
    "# Model Overview",
    "## Data",
    "## Training configuration",
    "## Performance",
    "## MONAI Bundle Commands",
    "# References",
    "# License",
]
LA_CHALLENGE_PAPER = (
    "A global benchmark of algorithms for segmenting the left atrium from late gadolinium-enhanced cardiac magnetic "
    "resonance imaging"
)
UAMT_PAPER = "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation"


def bundle_text(name: str, rel: str) -> str:
    """``bundles/NAME/REL`` as text."""
    return (BUNDLES / name / rel).read_text(encoding="utf-8")


def flat(text: str) -> str:
    """``text`` with every run of whitespace made one space (wrapped lines read as one)."""
    return " ".join(text.split())


def headings(markdown: str):
    """The ``#`` and ``##`` headings of a Markdown text, outside fenced code blocks (a shell comment is no heading)."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return [line.rstrip() for line in prose.splitlines() if re.match(r"^#{1,2} \S", line)]


def test_headings_ignore_code_blocks():
    text = "# Model Overview\n```bash\n# a comment\npython x.py\n```\n## Data\n### Preprocessing\n"
    assert headings(text) == ["# Model Overview", "## Data"]


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_readme_has_the_zoo_sections_in_order(name):
    found = headings(bundle_text(name, "docs/README.md"))
    missing = [s for s in README_SECTIONS if s not in found]
    assert not missing, f"{name}/docs/README.md lacks {missing}; its headings: {found}"
    assert [s for s in found if s in README_SECTIONS] == README_SECTIONS, f"{name}: sections out of order: {found}"
    assert found[0] == "# Model Overview"


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_data_license_names_the_data_its_terms_and_citations(name):
    text = flat(bundle_text(name, "docs/data_license.txt"))
    assert f"Bundle {name}:" in text  # written for this bundle: what its weights and figures used
    # the LA data: the challenge, its reference paper (DOI), the UA-MT release and paper
    assert "2018 Atrial Segmentation Challenge" in text and "atriaseg2018.cardiacatlas.org" in text
    assert LA_CHALLENGE_PAPER in text and "Medical Image Analysis 67" in text and "10.1016/j.media.2020.101832" in text
    assert "github.com/yulequan/UA-MT" in text and UAMT_PAPER in text and "arXiv:1907.07034" in text
    # the project's synthetic data, and the statement of what is not known
    assert "medssl.lab.sample_data" in text and "Apache License 2.0" in text
    assert "What is not known" in text
    # the README says where the data's terms are
    assert "docs/data_license.txt" in bundle_text(name, "docs/README.md")
