"""`refine push` to a local stand-in of the Hub and to S3-compatible storage; the dataset card."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import yaml

from refine.card import public_command

from hub_server import HubStandIn

TOKEN = "hf_refineTestToken0123456789abcdef"


@pytest.fixture
def refined(tiny_run):
    return tiny_run / "out"


def run(args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "refine", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_card_front_matter_and_provenance(refined):
    card = (refined / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    pattern = meta["configs"][0]["data_files"][0]["path"]
    assert list(refined.glob(pattern)) == sorted((refined / "data").glob("*.parquet"))
    assert meta["size_categories"] == ["n<1K"]
    manifest = json.loads((refined / "manifest.json").read_text())
    for fact in ("## Provenance", "teacher", "reference", "α = 0.5", "30 → 15",
                 f"{manifest['tokens_before']:,} → {manifest['tokens_after']:,}", f"{manifest['threshold']:.4f}",
                 public_command(manifest["scores"]["command"]), public_command(manifest["command"]),
                 manifest["refine_version"]):
        assert fact in card, fact
    assert len(datasets.load_dataset(str(refined), split="train")) == 15


def test_push_to_hub_delivers_every_file_byte_identical(tmp_path, refined):
    with HubStandIn(tmp_path / "hub") as hub:
        result = run(["push", refined, "someone/refined-tiny", "--token", TOKEN, "--revision", "v1"],
                     env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert "published" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert len(hub.commits) == 1  # shards, card and manifest in one commit
    stored = tmp_path / "hub" / "someone/refined-tiny" / "v1"
    local = sorted(p.relative_to(refined) for p in refined.rglob("*") if p.is_file())
    assert sorted(p.relative_to(stored) for p in stored.rglob("*") if p.is_file()) == local
    for path in local:
        assert (stored / path).read_bytes() == (refined / path).read_bytes()
    assert {r["auth"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}
    remote = datasets.load_dataset(str(stored), split="train")
    assert remote.to_list() == datasets.load_dataset(str(refined), split="train").to_list()


def test_sample_push_to_hub_keeps_the_token_out_of_outputs(tmp_path, refined):
    scores = refined.parent / "scores"
    with HubStandIn(tmp_path / "hub") as hub:
        result = run(["sample", scores, "--alpha", 0.3, "--output", tmp_path / "out", "--push-to-hub", "me/r03",
                      "--token", TOKEN], env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert "kept 9 of 30" in result.stdout and "published" in result.stdout
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert "--token ***" in json.loads((tmp_path / "out" / "manifest.json").read_text())["command"]
    assert (tmp_path / "hub" / "me/r03" / "main" / "manifest.json").exists()


def test_push_to_a_local_fsspec_path(tmp_path, refined):
    target = tmp_path / "published"
    run(["push", refined, f"file://{target}"])
    assert datasets.load_dataset(str(target), split="train").num_rows == 15
    assert "already holds" in run(["push", refined, f"file://{target}"], check=False).stderr


def test_push_refuses_a_folder_that_is_not_refined(tmp_path):
    result = run(["push", tmp_path, "someone/x"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "not a finished `refine sample` output" in result.stderr


def test_push_to_s3_compatible_server(refined, s3_endpoint):
    """A real S3 API (moto in server mode) on loopback, reached through fsspec/s3fs."""
    import s3fs

    run(["push", refined, "s3://corpora/refined/v1"])
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    local = sorted(str(p.relative_to(refined)) for p in refined.rglob("*") if p.is_file())
    remote = sorted(p.removeprefix("corpora/refined/v1/") for p in fs.find("corpora/refined/v1"))
    assert remote == local
    for name in local:
        assert fs.cat(f"corpora/refined/v1/{name}") == (refined / name).read_bytes()
    rows = datasets.load_dataset("parquet", data_files="s3://corpora/refined/v1/data/*.parquet", split="train",
                                 storage_options={"endpoint_url": s3_endpoint})
    assert rows.num_rows == 15


@pytest.mark.parametrize("target, env, message", [
    ("not a repo!", {}, "not a valid Hub dataset repo id"),
    ("a/b/c", {}, "not a valid Hub dataset repo id"),
    ("someone/name", {"HF_HUB_OFFLINE": "1"}, "offline mode"),
    ("someone/name", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "could not reach the Hub"),
])
def test_push_faults_are_one_line(refined, target, env, message):
    result = run(["push", refined, target, "--token", TOKEN], env=env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and TOKEN not in result.stderr


def test_push_refuses_a_target_that_is_a_file(tmp_path, refined):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    result = run(["push", refined, target], check=False)
    assert result.returncode == 2 and "existing file" in result.stderr
    assert target.read_text() == "mine"


def test_large_push_decision():
    from refine.push import LARGE_PUSH_BYTES, LARGE_PUSH_FILES, is_large_push

    assert not is_large_push(LARGE_PUSH_FILES, LARGE_PUSH_BYTES)
    assert is_large_push(LARGE_PUSH_FILES + 1, 1) and is_large_push(3, LARGE_PUSH_BYTES + 1)


def test_large_push_sends_data_first_then_card_and_manifest(tmp_path, refined, monkeypatch):
    import huggingface_hub

    import refine.push as stage
    from refine.config import PushConfig

    monkeypatch.setattr(stage, "LARGE_PUSH_FILES", 0)  # the tiny dataset counts as large
    with HubStandIn(tmp_path / "hub") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        stage.push(PushConfig(refined=str(refined), target="someone/large", token=TOKEN))
    assert len(hub.commits) >= 2 and hub.commits[-1]["files"] == ["README.md", "manifest.json"]
    assert sorted(f for c in hub.commits[:-1] for f in c["files"]) == sorted(
        p.relative_to(refined).as_posix() for p in (refined / "data").glob("*.parquet"))
    stored = tmp_path / "hub" / "someone/large" / "main"
    for path in (p for p in refined.rglob("*") if p.is_file()):
        assert (stored / path.relative_to(refined)).read_bytes() == path.read_bytes()
