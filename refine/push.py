"""`refine push`: publish a refined dataset folder to the Hugging Face Hub or any fsspec location.

The folder `refine sample` writes is uploaded as it is (Parquet shards, the dataset card, the
manifest), so `datasets.load_dataset(folder)` and `datasets.load_dataset(repo_id)` give the same rows.
"""

from __future__ import annotations

from pathlib import Path

from refine.config import PushConfig
from refine.errors import RefineError
from refine.output import DATA_DIR, MANIFEST, read_manifest


def refined_files(folder: Path) -> list[Path]:
    """The files to publish, data first and the manifest (the completion marker) last."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage") != "sample":
        raise RefineError(
            f"{str(folder)!r} is not a finished refined dataset (no manifest.json from `refine sample`); "
            "check the path or run refine sample first"
        )
    data = sorted((folder / DATA_DIR).glob("*.parquet"))
    return [*data, folder / "README.md", folder / MANIFEST]


def is_fsspec_url(target: str) -> bool:
    return "://" in target and not target.startswith("hf://") or target.startswith(("/", ".", "~"))


def push(cfg: PushConfig) -> dict:
    """Upload `cfg.refined` to `cfg.target`; return where it went."""
    folder = Path(cfg.refined)
    files = refined_files(folder)
    if is_fsspec_url(cfg.target):
        return _push_fsspec(folder, files, cfg.target)
    return _push_hub(folder, files, cfg)


def _push_hub(folder: Path, files: list[Path], cfg: PushConfig) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = cfg.target.removeprefix("hf://datasets/")
    if repo_id.count("/") != 1:
        raise RefineError(f"{cfg.target!r} is not a Hub dataset repo id; give it as user/name (or an fsspec URL)")
    manifest = read_manifest(folder)
    message = cfg.commit_message or f"refine: {manifest['method']} sampling, alpha={manifest['alpha']}"
    # token=None lets huggingface_hub find HF_TOKEN or the login cache itself; it is never echoed.
    api = HfApi(token=cfg.token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=cfg.private, exist_ok=True)
        if cfg.revision:
            api.create_branch(repo_id, branch=cfg.revision, repo_type="dataset", exist_ok=True)
        # One commit: shards, card and manifest land together. Large files go through the Hub's
        # content-addressed storage, so a rerun after a broken upload skips what already arrived.
        operations = [CommitOperationAdd(path_in_repo=str(f.relative_to(folder)), path_or_fileobj=str(f)) for f in files]
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="dataset", revision=cfg.revision)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        hint = "check the token's write access" if status in (401, 403) else "check the repo id and your connection"
        raise RefineError(f"the Hub refused the upload to {repo_id!r} (HTTP {status}); {hint}") from None
    return {"target": repo_id, "commit": info.oid, "url": info.commit_url, "files": len(files)}


def _push_fsspec(folder: Path, files: list[Path], target: str) -> dict:
    import fsspec

    fs, root = fsspec.core.url_to_fs(target)
    if fs.exists(f"{root}/{MANIFEST}"):
        raise RefineError(f"{target!r} already holds a published dataset; choose another target or delete it first")
    for f in files:  # manifest last: a broken copy never looks complete
        remote = f"{root}/{f.relative_to(folder).as_posix()}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), remote)
    return {"target": target, "files": len(files)}
