import html
import shutil
import subprocess

import pandas as pd
import pytest
from typer.testing import CliRunner

from refine.cli import app
from refine.report import scatter_sample

SECTIONS = ("summary", "distribution", "scatter", "groups", "examples")


@pytest.fixture(scope="module")
def report_file(tiny_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(app, ["report", str(tiny_run / "scores"), "--group-column", "domain", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "15 of 30 instances kept at alpha=0.5" in result.stdout
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


def test_examples_show_their_own_text_and_summary_weights_by_tokens(tiny_run, report_file):
    scores = pd.concat([pd.read_parquet(p) for p in sorted((tiny_run / "scores" / "data").glob("*.parquet"))])
    texts = pd.read_json(tiny_run / "corpus.jsonl", lines=True)["text"]
    ranked = scores.sort_values(["score", "id"], ascending=[False, True])
    page = report_file.read_text()
    for position in (0, -1):
        row_id, score = int(ranked["id"].iloc[position]), ranked["score"].iloc[position]
        start = page.index(f"<tr><td>{row_id}</td><td>{score:.3f}</td>")
        assert f"<pre>{html.escape(texts[row_id])}</pre>" in page[start : page.index("</tr>", start)]
    kept = ranked.head(15)
    assert f"50.0% of instances, {kept['n_tokens'].sum() / scores['n_tokens'].sum():.1%} of tokens" in page
    for heading in ("tokens before", "token share after", "kept (tokens)"):
        assert f"<th>{heading}</th>" in page


def test_scatter_draws_every_point_up_to_the_limit_then_a_seeded_sample():
    assert scatter_sample(5, limit=10).tolist() == [0, 1, 2, 3, 4]
    drawn = scatter_sample(1000, limit=10)
    assert len(set(drawn)) == 10 and drawn.tolist() == sorted(drawn) and drawn.max() < 1000
    assert drawn.tolist() == scatter_sample(1000, limit=10).tolist()  # same page for the same scores


def test_report_on_chunks_reads_each_example_text_from_its_score_shard(tmp_path, teacher_dir, reference_dir):
    from test_sample import write_scored_corpus

    write_scored_corpus(tmp_path, teacher_dir, reference_dir, "chunk", None)
    output = tmp_path / "chunks.html"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "scores"), "--output", str(output), "--n-examples", "2"])
    assert result.exit_code == 0, result.output
    scores = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scores" / "data").glob("*.parquet"))])
    page = output.read_text()
    for _, chunk in scores.sort_values(["score", "id"], ascending=[False, True]).iloc[[0, 1, -2, -1]].iterrows():
        start = page.index(f"<tr><td>{chunk['id']}</td>")
        assert f"<pre>{html.escape(chunk['text'][:400])}" in page[start : page.index("</tr>", start)]
    result = CliRunner().invoke(app, ["report", str(tmp_path / "scores"), "--group-column", "domain",
                                      "--output", str(tmp_path / "grouped.html")])
    assert result.exit_code == 2 and "--group-column needs document-level scores" in result.stderr
    assert not (tmp_path / "grouped.html").exists()


def test_report_with_samples_flags_shows_what_that_sample_kept_per_group(tiny_run, tmp_path):
    import datasets

    flags = ["--token-fraction", "0.4", "--temperature", "0.3", "--seed", "2", "--group-column", "domain", "--balance", "equal"]
    runner = CliRunner()
    result = runner.invoke(app, ["sample", str(tiny_run / "scores"), "--output", str(tmp_path / "out"), *flags])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(tiny_run / "scores"), "--output", str(tmp_path / "r.html"), *flags])
    assert result.exit_code == 0, result.output
    refined = datasets.load_dataset(str(tmp_path / "out"), split="train").to_pandas()
    scores = pd.concat([pd.read_parquet(p) for p in sorted((tiny_run / "scores" / "data").glob("*.parquet"))])
    scores["domain"] = pd.read_json(tiny_run / "corpus.jsonl", lines=True)["domain"].to_numpy()[scores["id"]]
    page = (tmp_path / "r.html").read_text()
    assert f"{len(refined)} of 30 instances kept at token-fraction=0.4" in result.stdout
    assert f"{refined['n_tokens'].sum() / scores['n_tokens'].sum():.1%} of tokens" in page  # the selected token share
    assert "no single score separates" in page and "within each group of `domain`, by equal shares" in page
    for domain, group in scores.groupby("domain"):
        before, after = group["n_tokens"].sum(), refined.loc[refined["domain"] == domain, "n_tokens"].sum()
        row = page[page.index(f"<tr><td>{domain}</td>"):]
        row = row[: row.index("</tr>")]
        assert f"<td>{before:,}</td><td>{after:,}</td>" in row and f"<td>{after / before:.0%}</td>" in row, row
