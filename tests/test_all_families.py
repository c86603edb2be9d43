"""Beyond the named families: every MoE family the installed transformers ships with the experts
seam gets a tiny config built from its config class and the same 16-bit equivalence. A family may
be refused (with a message saying why) or have no tiny model transformers can run, but it may
never give different numbers or fail with anything but our own error. The summary lists each."""
import pytest

from families import NAMED, check_family, seam_families

OTHERS = [f for f in seam_families() if f not in NAMED]


@pytest.mark.parametrize("family", OTHERS)
def test_family_equals_transformers_or_says_why(family, tmp_path, family_report):
    status, detail = check_family(family, tmp_path)
    family_report.append(f"{family:24s} {status:13s} {detail}")
    assert status != "wrong", f"{family}: max |logit diff| {detail}"
