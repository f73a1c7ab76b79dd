"""A mixed-quality corpus built from text on every machine (the Python standard library), no download.

Sources, each document tagged in a `source` column:
- `docstring`: module, class and function docstrings (technical prose);
- `code`: function and class source;
- `boilerplate`: near-duplicate license headers and changelog entries (easy, common text);
- `noise`: synthetic garbage (random characters and shuffled word salad).
"""

from __future__ import annotations

import ast
import random
import string
import sysconfig
from pathlib import Path

LICENSE_TEMPLATES = [
    "Copyright (c) {year} {owner}. All rights reserved.\n\nLicensed under the Apache License, Version 2.0 (the "
    "\"License\"); you may not use this file except in compliance with the License. You may obtain a copy of the "
    "License at http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to in "
    "writing, software distributed under the License is distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR "
    "CONDITIONS OF ANY KIND, either express or implied.",
    "{package} ({version}) unstable; urgency=medium\n\n  * New upstream release.\n  * Bump standards version.\n"
    "  * Update {file} for the new build system.\n\n -- {owner} <maint@example.org>  Mon, 0{day} Jan {year} 12:00:00 +0000",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software ({package}), to "
    "deal in the Software without restriction, including without limitation the rights to use, copy, modify, merge, "
    "publish, distribute, sublicense, and/or sell copies of the Software. Copyright {year} {owner}.",
]
OWNERS = ["Jane Doe", "The Authors", "Example Corp", "A. Maintainer", "Foo Bar Ltd"]


def _clip(text: str, max_chars: int) -> str:
    """Cut at the last line break before max_chars, so documents stay bounded but end cleanly."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


def stdlib_documents(max_chars: int = 1200, min_chars: int = 200) -> tuple[list[str], list[str]]:
    """(docstrings, code snippets) from the standard library's .py files, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docstrings, code = [], []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            lines = source.splitlines(keepends=True)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if not isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                docstrings.append(_clip(doc, max_chars))
            if not isinstance(node, ast.Module):
                segment = "".join(lines[node.lineno - 1 : node.end_lineno])
                if segment and min_chars <= len(segment) <= 4 * max_chars:
                    code.append(_clip(segment, max_chars))
    return docstrings, code


def boilerplate_document(rng: random.Random) -> str:
    return rng.choice(LICENSE_TEMPLATES).format(
        year=rng.randint(1998, 2025), owner=rng.choice(OWNERS), package=rng.choice(["libfoo", "pybar", "bazutils"]),
        version=f"{rng.randint(0, 9)}.{rng.randint(0, 20)}-1", file=rng.choice(["debian/rules", "setup.py", "Makefile"]),
        day=rng.randint(1, 9),
    )


def noise_document(rng: random.Random, words: list[str], max_chars: int) -> str:
    length = rng.randint(max_chars // 8, max_chars // 2)
    if rng.random() < 0.5:
        alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
        return "".join(rng.choice(alphabet) for _ in range(length))
    text = " ".join(rng.choice(words) for _ in range(length // 6))
    return text[:length]


def build_corpus(n_docs: int, seed: int = 0, noise_fraction: float = 0.15, boilerplate_fraction: float = 0.15,
                 max_chars: int = 1200) -> list[dict]:
    """`n_docs` documents {"text", "source"} mixed from the four sources, shuffled with `seed`."""
    rng = random.Random(seed)
    docstrings, code = stdlib_documents(max_chars)
    rng.shuffle(docstrings)
    rng.shuffle(code)
    n_noise = round(noise_fraction * n_docs)
    n_boilerplate = round(boilerplate_fraction * n_docs)
    n_docstring = (n_docs - n_noise - n_boilerplate) // 2
    n_code = n_docs - n_noise - n_boilerplate - n_docstring
    if n_docstring > len(docstrings) or n_code > len(code):
        raise ValueError(f"the standard library offers {len(docstrings)} docstrings and {len(code)} code snippets; ask for fewer documents")
    words = sorted({w for d in docstrings[:200] for w in d.split() if w.isalpha()})
    documents = (
        [{"text": t, "source": "docstring"} for t in docstrings[:n_docstring]]
        + [{"text": t, "source": "code"} for t in code[:n_code]]
        + [{"text": boilerplate_document(rng), "source": "boilerplate"} for _ in range(n_boilerplate)]
        + [{"text": noise_document(rng, words, max_chars), "source": "noise"} for _ in range(n_noise)]
    )
    rng.shuffle(documents)
    return documents
