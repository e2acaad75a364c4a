"""report.html: the verdict first, every example with its diagnosis, plots and probes, user text escaped, and
a page a real browser renders without a console error."""

import re
import shutil
import subprocess

import pytest

from hoppatch.engine.evaluate import Rates
from hoppatch.engine.report import plot_summary
from hoppatch.report_page import render

HOSTILE = '<script>alert("x")</script> & "$\\foo$"'


def _document() -> dict:
    reading = {"gives": "Paris", "text": "Paris, the capital", "p_answer": 0.4}
    probe = {"kind": "correction", "prompt": HOSTILE, "answer": "Paris", "success": True, "before": {**reading, "text": "Rome"}, "after": reading}
    example = {"id": "dupin", "verdict": "compositional_failure", "prediction_before": "Rome", "scale": 1.0, "dropped_reason": None,
               "hop1": {"gives": "Poe", "p": 0.9}, "hop2": {"gives": "Paris", "p": 0.8}, "query": {"gives": "Rome", "p": 0.5}, "probes": [probe]}
    untouched = {**example, "id": "known", "verdict": "already_correct", "probes": []}
    summary = {"examples": 2, "patched": 1, "dropped": 0, "layers": [4, 5], "rank": 1, "correction_rate": 1.0, "correction_rate_before": 0.0,
               "paraphrase_rate": None, "paraphrase_rate_before": None, "generalization_rate": 0.5, "generalization_rate_before": 0.0,
               "specificity_rate": 0.9, "specificity_kept_or_right_rate": 0.95, "specificity_right_rate": 0.5,
               "specificity_right_rate_before": 0.6, "specificity_right_kept_rate": 0.8,
               "perplexity_before": 20.0, "perplexity_after": 20.4, "kl_drift": 0.01}
    return {"hoppatch_version": "0.1.0", "model": HOSTILE, "summary": summary, "examples": [example, untouched]}


@pytest.fixture
def page(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    rates = Rates(
        correction=1.0, paraphrase=None, generalization=0.5, specificity=0.9, specificity_kept_or_right=0.95,
        specificity_right=0.5, specificity_right_kept=0.8, correction_before=0.0, paraphrase_before=None,
        generalization_before=0.0, specificity_right_before=0.6, event_before=0.0, event_after=1.0,
    )
    plot_summary(report / "summary.png", rates)
    shutil.copy(report / "summary.png", report / "example-dupin.png")
    path = tmp_path / "report.html"
    path.write_text(render(_document(), report), encoding="utf-8")
    return path


def test_the_page_opens_with_the_verdict_and_escapes_every_user_string(page):
    html = page.read_text()
    assert html.index('id="verdict"') < html.index('id="examples"') < html.index('id="example-dupin"') < html.index('id="example-known"')
    assert "<script>" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2  # the summary and the patched example
    assert "Not patched: no probes." in html
    # the unrelated queries' own answers: given before and after, and of those given before, the share kept
    assert re.search(r"<th>unrelated queries answered right</th><td>0\.600</td><td>0\.500</td>", html)
    assert re.search(r"<th>of those answered right before, still right</th><td>–</td><td>0\.800</td>", html)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="needs chromium (make test installs it)")
def test_chromium_renders_the_page_with_its_sections_and_no_console_error(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    for section in ('id="verdict"', 'id="examples"', 'id="example-dupin"', "Diagnosis", "Logit lens and causal sweep", "Probes, before and after"):
        assert section in dom
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Content Security Policy" in line]
    assert console == [], console
