"""scripts/readme_tables.py: the README's suite section generated from a report.json written by a real suite
(tests/fixtures/suite-quick-report.json: `twinlm suite --quick pretrain_tokens=20K extension_tokens=4K
decay_tokens=4K cross_tokens=6K pairs.per_family=20 bpb.max_docs=10 generative.limit=20
retrieval.max_eval_queries=50` from an empty folder at a clean commit, 2026-12-07), written between
the markers, checked, and refused for a folder whose steps came from several commits."""

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import readme_tables as rt  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "suite-quick-report.json"


@pytest.fixture
def report():
    return json.loads(FIXTURE.read_text())


def test_section_quotes_the_reports_figures_and_what_made_them(report):
    text = rt.section(report)
    assert text.startswith(rt.BEGIN) and text.endswith(rt.END)
    enc = report["intrinsic"]["encoder"]["bpb"]
    assert f"| encoder | {enc['value']:.3f} [{enc['ci95'][0]:.3f}, {enc['ci95'][1]:.3f}] |" in text
    (retrieval,) = [c for f in report["findings"]["findings"] for c in f["comparisons"]
                    if c["claim"] == "encoder > decoder on retrieval"]
    assert f"retrieval {retrieval['margin']:+.2f} (spread {retrieval['spread']:.2f})" in text
    made = report["provenance"]["runs"][0]["provenance"]
    assert f"commit `{made['commit'][:12]}`" in text and f"torch {made['torch']}" in text
    assert f"{made['torch_threads']} torch threads" in text and "`quick` suite" in text


def test_write_replaces_only_the_section_and_check_finds_an_edited_figure(tmp_path, report):
    readme, kept, images = tmp_path / "README.md", tmp_path / "kept.json", tmp_path / "img"
    images.mkdir()
    readme.write_text(f"# title\n\nbefore\n\n{rt.BEGIN} (old) -->\nold figures\n{rt.END}\n\nafter\n")
    rt.write(FIXTURE, readme=readme, kept=kept, images=images, scale="quick")
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{rt.END}\n\nafter\n")
    assert "old figures" not in text and rt.section(report) in text
    assert json.loads(kept.read_text()) == report
    assert rt.check(readme=readme, kept=kept) == []
    enc = f"{report['intrinsic']['encoder']['bpb']['value']:.3f}"
    readme.write_text(text.replace(f"| encoder | {enc}", "| encoder | 9.999", 1))
    (problem,) = rt.check(readme=readme, kept=kept)
    assert "not what kept.json gives" in problem


def test_write_refuses_a_report_of_several_commits_or_another_scale(tmp_path, report):
    readme = tmp_path / "README.md"
    readme.write_text(f"{rt.BEGIN} -->\n{rt.END}\n")
    mixed = copy.deepcopy(report)
    mixed["provenance"]["runs"].append({"provenance": {"commit": "0" * 40, "dirty": False}, "steps": ["report"]})
    mixed["provenance"]["single"] = False
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    with pytest.raises(rt.ReadmeError, match="not all computed by one clean commit"):
        rt.write(tmp_path / "mixed.json", readme=readme, kept=tmp_path / "kept.json", images=tmp_path, scale="quick")
    with pytest.raises(rt.ReadmeError, match="the README quotes the `cpu` scale"):
        rt.write(FIXTURE, readme=readme, kept=tmp_path / "kept.json", images=tmp_path)
    assert readme.read_text() == f"{rt.BEGIN} -->\n{rt.END}\n" and not (tmp_path / "kept.json").exists()


def test_the_readme_has_the_section_and_it_is_the_kept_reports():
    before, current, after = rt.split_readme(rt.README.read_text())
    assert "scripts/readme_tables.py runs/suite-cpu/report/report.json --write" in before
    if rt.KEPT.exists():  # once a cpu suite's report is kept, the README's section must be its output
        assert rt.check() == []
