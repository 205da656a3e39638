"""Publishing an export directory to the Hugging Face Hub.

Up to `LARGE_FOLDER_BYTES` the export goes up in one atomic commit (`HfApi.create_commit`, what
`upload_folder` does for a folder of this size). Above it (a multi-GB export of a large model) it goes
up resumably in several commits: `HfApi.upload_large_folder` where the installed huggingface_hub has
it (0.25 on); from the release whose `upload_folder` became a streamed, resumable, multi-commit uploader
(with hf_xet: huggingface_hub PR #4331; PR #4414 deprecated upload_large_folder in its favour and 2.x
no longer has it) the large path is `upload_folder`. Re-running the same push resumes an interrupted
large upload. `upload_large_folder` takes no commit message (its commits have their own) and keeps
its resume state in `FOLDER/.cache/huggingface/` (hidden: never uploaded, never listed).

The token comes from huggingface_hub's own lookup (HF_TOKEN or `hf auth login`), never from a flag,
and is never printed. `HF_ENDPOINT` (read by huggingface_hub at import) or `endpoint=` point at
another Hub deployment.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

log = logging.getLogger(__name__)

# exports above this many bytes are uploaded resumably in several commits (see the module docstring)
LARGE_FOLDER_BYTES = 5 * 1024 ** 3
HIDDEN = [".*", "**/.*", ".*/**", "**/.*/**"]  # what files_to_upload leaves out


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


def describe(folder: str, repo_id: Optional[str], revision: Optional[str], private: bool,
             large_threshold: int = LARGE_FOLDER_BYTES) -> str:
    """The files a push would upload, with sizes (the export's files when there is no repo)."""
    files = files_to_upload(folder)
    nbytes = sum(s for _, s in files)
    total = f"{len(files)} files ({human_size(nbytes)})"
    if repo_id:
        method = upload_method(nbytes, None, large_threshold)
        how = "in one commit" if method == "create_commit" else f"resumably in several commits (HfApi.{method})"
        lines = [f"would upload {total} to {repo_id}@{revision or 'main'} ({'private' if private else 'public'}) "
                 f"{how}:"]
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


def upload_method(total_bytes: int, api=None, large_threshold: int = LARGE_FOLDER_BYTES) -> str:
    """The HfApi method a push of `total_bytes` uses: create_commit (one commit) up to `large_threshold`,
    else upload_large_folder, or upload_folder on huggingface_hub versions without it."""
    if total_bytes <= large_threshold:
        return "create_commit"
    if api is None:
        from huggingface_hub import HfApi as api
    import importlib.util

    streamed = importlib.util.find_spec("huggingface_hub._upload_pipeline") is not None  # upload_folder resumes
    return "upload_large_folder" if hasattr(api, "upload_large_folder") and not streamed else "upload_folder"


def _push_large(api, method: str, folder: str, repo_id: str, revision: Optional[str], private: bool,
                commit_message: str) -> str:
    if method == "upload_large_folder":  # huggingface_hub < 2: no commit message, no commit URL returned
        log.info("upload_large_folder names its own commits; --commit-message %r is not used", commit_message)
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                private=private, ignore_patterns=HIDDEN)
        return f"{api.endpoint}/{repo_id}/tree/{revision or 'main'}"
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                             commit_message=commit_message, ignore_patterns=HIDDEN)
    return info.commit_url


def push(folder: str, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, endpoint: Optional[str] = None,
         large_threshold: int = LARGE_FOLDER_BYTES) -> str:
    """Create the repo if needed (and the branch `revision`), then upload every file: in one commit up to
    `large_threshold` bytes, resumably in several above it (see the module docstring); returns the
    commit URL (of the last commit; for upload_large_folder, the revision's tree). Raises HubError with
    the cause and how to retry."""
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
    total = sum(size for _, size in files)
    method = upload_method(total, api, large_threshold)
    message = commit_message or f"Upload {os.path.basename(folder)} exported with vlp"
    log.info("uploading %d files (%s) to %s with HfApi.%s", len(files), human_size(total), repo_id, method)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        if method != "create_commit":
            return _push_large(api, method, folder, repo_id, revision, private, message)
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(folder, path)) for path, _ in files]
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, repo_type="model")
    except Exception as e:  # network, HTTP and auth errors all end the same way for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"upload to {repo_id} at {api.endpoint} failed: {type(e).__name__}: {msg}; {retry}") from e
    return info.commit_url


__all__ = ["HubError", "files_to_upload", "describe", "push", "preflight", "human_size", "upload_method",
           "LARGE_FOLDER_BYTES"]
