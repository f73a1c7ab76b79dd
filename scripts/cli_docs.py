"""Write docs/cli.md, the reference of every command and option, from the CLI itself (which the configs generate).

    python scripts/cli_docs.py          # rewrite docs/cli.md
    python scripts/cli_docs.py --check  # exit 1 if docs/cli.md is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    from typer.main import get_command

    from refine.cli import app

    group = get_command(app)
    lines = ["# Command-line reference", "",
             "Generated from refine's config dataclasses by `python scripts/cli_docs.py`; every option can also be "
             "given as a key (with underscores) of the YAML file passed with `--config`, and flags override it.", ""]
    for name, command in group.commands.items():
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        usage = " ".join([f"refine {name}"] + [(p.metavar or p.name.upper()) for p in arguments] + ["[OPTIONS]"])
        lines += [f"## `refine {name}`", "", (command.help or "").strip(), "", f"```\n{usage}\n```", "",
                  "| option | what it is |", "|---|---|"]
        for param in command.params:
            names = (param.metavar or param.name.upper()) if param.param_type_name == "argument" else " / ".join(
                [*param.opts, *param.secondary_opts])
            text = " ".join((getattr(param, "help", None) or "").split()).replace("|", "\\|")
            lines.append(f"| `{names}` | {text} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/cli.md differs from what the CLI says")
    args = parser.parse_args()
    text = render()
    if args.check:
        sys.exit(0 if DOC.exists() and DOC.read_text() == text else 1)
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
