"""Publishing an export directory to the Hugging Face Hub in one commit.

The token comes from huggingface_hub's own lookup (HF_TOKEN or `hf auth login`), never from a flag,
and is never printed. `HF_ENDPOINT` (read by huggingface_hub at import) or `endpoint=` point at
another Hub deployment.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple


class HubError(RuntimeError):
    """The upload failed; the local export is complete and untouched."""


def files_to_upload(folder: str) -> List[Tuple[str, int]]:
    """(path in repo, size in bytes) of every file under `folder`, sorted; hidden files excluded."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            out.append((os.path.relpath(full, folder).replace(os.sep, "/"), os.path.getsize(full)))
    return out


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def describe(folder: str, repo_id: Optional[str], revision: Optional[str], private: bool) -> str:
    """The files a push would upload, with sizes (the export's files when there is no repo)."""
    files = files_to_upload(folder)
    total = f"{len(files)} files ({human_size(sum(s for _, s in files))})"
    if repo_id:
        lines = [f"would upload {total} to {repo_id}@{revision or 'main'} ({'private' if private else 'public'}) "
                 "in one commit:"]
    else:
        lines = [f"{total} in {folder} (no --push-to-hub: nothing to upload):"]
    lines += [f"  {human_size(size):>10}  {path}" for path, size in files]
    return "\n".join(lines)


def preflight(repo_id: str) -> None:
    """Fail before any work when a push cannot start: a malformed repo id, offline mode, no token."""
    from huggingface_hub import constants, get_token

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--push-to-hub {repo_id!r}: give ORG/NAME (or USER/NAME)")
    if constants.is_offline_mode():
        raise HubError(f"HF_HUB_OFFLINE is set: unset it to push to {repo_id}")
    if get_token() is None:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")


def push(folder: str, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """Create the repo if needed (and the branch `revision`), then commit every file at once; returns
    the commit URL. Raises HubError with the cause and how to retry."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    retry = (f"the export in {folder} is complete; retry the upload with `hf upload {repo_id} {folder} . "
             f"--repo-type model{' --revision ' + revision if revision else ''}` or rerun this command")
    if constants.is_offline_mode():
        raise HubError(f"HF_HUB_OFFLINE is set: unset it to push to {repo_id}; {retry}")
    if "/" not in repo_id.strip("/") or repo_id.count("/") != 1:
        raise HubError(f"--push-to-hub {repo_id!r}: give ORG/NAME (or USER/NAME)")
    if get_token() is None:
        raise HubError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {retry}")
    api = HfApi(endpoint=endpoint)
    files = files_to_upload(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(folder, path)) for path, _ in files]
        info = api.create_commit(repo_id, ops, commit_message=commit_message or f"Upload {os.path.basename(folder)} "
                                 "exported with vlp", revision=revision, repo_type="model")
    except Exception as e:  # network, HTTP and auth errors all end the same way for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"upload to {repo_id} at {api.endpoint} failed: {type(e).__name__}: {msg}; {retry}") from e
    return info.commit_url


__all__ = ["HubError", "files_to_upload", "describe", "push", "preflight", "human_size"]
