"""`refine push`: publish a refined dataset folder to the Hugging Face Hub or any fsspec location.

The folder `refine sample` writes is uploaded as it is (Parquet shards, the dataset card, the
manifest), so `datasets.load_dataset(folder)` and `datasets.load_dataset(repo_id)` give the same rows.
Every file is checked against the manifest before the first byte leaves the machine.

A small dataset goes to the Hub in one commit. A large one (see `is_large_push`) goes in two steps: the
data shards through `HfApi.upload_folder`, which with `hf_xet` installed commits in batches and resumes
an interrupted upload when rerun (committed files are skipped, uploaded chunks deduplicated), then the
card and the manifest in one small last commit, so the repo looks finished only once every shard is in.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from refine.card import budget_text
from refine.config import PushConfig
from refine.errors import RefineError
from refine.output import MANIFEST, claim, verify, write_fault


# Beyond either limit one commit is too big to be safe: the Hub advises against commits of many files, and a
# failed upload of several GB in a single commit starts over from the first byte.
LARGE_PUSH_FILES = 50
LARGE_PUSH_BYTES = 5 * 2**30


def is_large_push(n_files: int, n_bytes: int) -> bool:
    """Whether a dataset of `n_files` files and `n_bytes` bytes goes to the Hub in resumable batches (else one commit)."""
    return n_files > LARGE_PUSH_FILES or n_bytes > LARGE_PUSH_BYTES


def refined_files(folder: Path) -> list[Path]:
    """The files to publish, checked against the manifest: data first and the manifest (the completion marker) last."""
    manifest = verify(folder, "sample")
    return [folder / record["path"] for record in manifest["files"]] + [folder / MANIFEST]


def is_fsspec_url(target: str) -> bool:
    return "://" in target and not target.startswith("hf://") or target.startswith(("/", ".", "~"))


def hub_repo_id(target: str) -> str:
    """The Hub dataset repo id of a target, or one error saying why it is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = target.removeprefix("hf://datasets/")
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must have the form user/name")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).strip().splitlines()[0].rstrip(".")
        raise RefineError(f"{target!r} is not a valid Hub dataset repo id ({reason}); give it as user/name "
                          "(letters, digits, '-', '_', '.'), or an fsspec URL / local path") from None
    return repo_id


def check_target(target: str) -> None:
    """What can be checked about a push target before any work: its form, and for a local path its place."""
    if not is_fsspec_url(target):
        hub_repo_id(target)
    elif "://" not in target or target.startswith("file://"):
        local = Path(target.removeprefix("file://")).expanduser()
        if local.exists() and not local.is_dir():
            raise RefineError(f"push target {target!r} is an existing file; give a directory path")


def push(cfg: PushConfig) -> dict:
    """Upload `cfg.refined` to `cfg.target`; return where it went."""
    check_target(cfg.target)
    folder = Path(cfg.refined)
    files = refined_files(folder)
    if is_fsspec_url(cfg.target):
        return _push_fsspec(folder, files, cfg.target)
    return _push_hub(folder, files, cfg)


def _push_hub(folder: Path, files: list[Path], cfg: PushConfig) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo_id = hub_repo_id(cfg.target)
    manifest = verify(folder, "sample", check_hashes=False)  # hashes were checked by refined_files
    message = cfg.commit_message or f"refine: {manifest['method']} sampling, {budget_text(manifest)}"
    # token=None lets huggingface_hub find HF_TOKEN or the login cache itself; it is never echoed.
    api = HfApi(token=cfg.token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=cfg.private, exist_ok=True)
        if cfg.revision:
            api.create_branch(repo_id, branch=cfg.revision, repo_type="dataset", exist_ok=True)
        names = [f.relative_to(folder).as_posix() for f in files]
        finishing = [n for n in names if n in ("README.md", MANIFEST)]
        if is_large_push(len(files), sum(f.stat().st_size for f in files)):
            # Data first, in as many commits as upload_folder needs (a rerun resumes); card and manifest last.
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset", revision=cfg.revision,
                              allow_patterns=[n for n in names if n not in finishing], commit_message=f"{message} (data)")
            names = finishing
        # One commit: shards (small datasets), card and manifest land together or not at all. Large files go
        # through the Hub's content-addressed storage, so a rerun after a broken upload skips what already arrived.
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="dataset", revision=cfg.revision)
    except OfflineModeIsEnabled:
        raise RefineError("the Hub is in offline mode (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE to publish, "
                          "or push to a local path or fsspec URL") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        hint = "check the token's write access" if status in (401, 403) else "check the repo id and your connection"
        raise RefineError(f"the Hub refused the upload to {repo_id!r} (HTTP {status}); {hint}, then rerun") from None
    except Exception as e:
        if not is_network_error(e):
            raise
        raise RefineError(f"could not reach the Hub to upload to {repo_id!r} ({type(e).__name__}); check the network "
                          "or HF_ENDPOINT, then rerun (nothing was published)") from None
    return {"target": repo_id, "commit": info.oid, "url": info.commit_url, "files": len(files)}


NETWORK_ERRORS = {"ConnectionError", "TransportError", "NetworkError", "ConnectError", "TimeoutException", "Timeout"}


def is_network_error(error: BaseException) -> bool:
    """A connection failure, whichever HTTP client huggingface_hub uses (requests, httpx, ...)."""
    return isinstance(error, (ConnectionError, TimeoutError)) or any(c.__name__ in NETWORK_ERRORS for c in type(error).__mro__)


def _push_fsspec(folder: Path, files: list[Path], target: str) -> dict:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(target)
    if fs.exists(f"{root}/{MANIFEST}"):
        raise RefineError(f"{target!r} already holds a published dataset; choose another target or delete it first")
    if isinstance(fs, LocalFileSystem):
        return _push_local(folder, files, Path(root), target)
    names = [f.relative_to(folder).as_posix() for f in files]
    present = [p.removeprefix(root.rstrip("/") + "/") for p in fs.find(root)] if fs.exists(root) else []
    foreign = sorted(set(present) - set(names))
    if foreign:
        raise RefineError(f"{target!r} holds files that are not part of this dataset ({', '.join(foreign[:3])}); "
                          "choose an empty target")
    for f, name in zip(files, names):  # manifest last: a broken copy never looks complete
        remote = f"{root}/{name}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), remote)
    return {"target": target, "files": len(files)}


def _push_local(folder: Path, files: list[Path], root: Path, target: str) -> dict:
    """A local target is a run directory like any other: claimed, locked, built beside it and renamed in."""
    with claim(root, "sample", [str(folder)], overwrite=False, staged=True) as claimed:
        staging = claimed.staging_dir()
        try:
            for f in files:
                destination = staging / f.relative_to(folder)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, destination)
            claimed.commit(staging)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_fault(e, root) from None
    return {"target": target, "files": len(files)}
