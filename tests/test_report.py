import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from refine.cli import app

SECTIONS = ("summary", "distribution", "scatter", "groups", "examples")


@pytest.fixture(scope="module")
def report_file(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(app, ["report", str(tiny_run / "scores"), "--group-column", "domain", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "15 of 30 instances kept" in result.stdout
    return output


def test_report_holds_every_section_with_embedded_figures(report_file):
    page = report_file.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 3  # distribution, scatter, groups
    for heading in ("Top (highest score)", "Boundary (around the cut)", "Bottom (lowest score)"):
        assert heading in page
    assert "30 → 15" in page and "d0" in page and "src=\"http" not in page  # self-contained


def test_report_renders_in_headless_chromium(report_file, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs it on Debian)")
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,1800",
         report_file.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(str(screenshot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05  # not a blank page: text, tables and figures
    assert (pixels[..., :3] < 0.5).mean() > 0.005  # some dark ink on the white page


def test_report_refuses_bad_input(tiny_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tiny_run / "scores"), "--group-column", "nope", "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "--group-column" in result.stderr
    result = runner.invoke(app, ["report", str(tiny_run / "scores"), "--alpha", "2", "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "outside (0, 1]" in result.stderr
    assert not (tmp_path / "r.html").exists()
