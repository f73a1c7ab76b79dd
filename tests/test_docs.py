"""The docs that are generated from the code stay generated from it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_the_cli():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), "run `python scripts/cli_docs.py`"


def test_readme_links_resolve():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_config_examples_in_the_docs_load(tmp_path):
    """Every YAML block of the docs that opens with `# refine <command> --config` is a valid config of that command."""
    import re

    from refine import config

    classes = {"score": config.ScoreConfig, "sample": config.SampleConfig, "pretrain": config.PretrainConfig,
               "distill-cache": config.DistillCacheConfig, "report": config.ReportConfig, "push": config.PushConfig}
    found = 0
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.S):
            opening = re.match(r"# refine (\S+) --config", block)
            if opening is None:
                continue
            path = tmp_path / f"{found}.yaml"
            path.write_text(block)
            config.load_config(classes[opening.group(1)], str(path))
            found += 1
    assert found >= 2
