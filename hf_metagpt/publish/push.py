"""Upload a merged folder to the Hub as one commit (retried without ever making two)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import InputError
from ..sources.hub_calls import (
    HubAccessError,
    RETRIES,
    RETRY_MAX,
    _api,
    _call,
    _failed_request,
    _gave_up,
    _hub_errors,
    _retry_base,
    _transient,
)

log = logging.getLogger(__name__)


def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         create_pr: bool = False, revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a merged model folder to `repo_id` as one commit and return the URL to look at.

    The repo is created when missing (private if asked); `revision` names a branch (created from
    main when missing); `create_pr` opens a pull request instead of committing to the branch.

    Example:
        >>> push("merged/", "me/llama-2-7b-metagpt", private=True)
        'https://huggingface.co/me/llama-2-7b-metagpt'
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a model folder (no config.json).",
                         hint="Push the output folder of a merge.")
    api = _api(token)
    repo_url = _call(repo_id, api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        _call(f"{repo_id}@{revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
    message = commit_message or f"Upload MetaGPT merge ({folder.name}) with hf-metagpt"
    info = _upload_one_commit(api, repo_id, folder, message, revision, create_pr)
    if create_pr and not getattr(info, "pr_url", None):
        log.warning("warning: nothing changed since the last commit of %s: no pull request opened", repo_id)
    url = getattr(info, "pr_url", None) or str(repo_url)
    if revision and not getattr(info, "pr_url", None):
        url = f"{str(repo_url).rstrip('/')}/tree/{revision}"
    log.info("pushed %s to %s (commit %s)", folder, url, getattr(info, "oid", "?"))
    return url


def _upload_one_commit(api, repo_id: str, folder: Path, message: str, revision: str | None, create_pr: bool):
    """`upload_folder` as exactly one commit, retried on transient failures.

    The client retries preupload and LFS transfers itself, but not the commit POST. A retry here
    re-runs the whole upload (LFS objects already stored are skipped by the Hub). The commit is
    pinned to the branch head seen before the first attempt (`parent_commit`), so a commit whose
    answer was lost is found (the head moved to a commit with our message) instead of repeated.
    """
    ref_text = repo_id if not revision else f"{repo_id}@{revision}"
    head = None if create_pr else _call(ref_text, lambda: api.model_info(repo_id, revision=revision).sha)
    delay = _retry_base()
    for attempt in range(RETRIES + 1):
        try:
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                     revision=revision, create_pr=create_pr, parent_commit=head,
                                     ignore_patterns=[".cache/**", "*.tmp", ".hf-metagpt*"])
        except Exception as exc:
            if not _transient(exc):
                mapped = _hub_errors(ref_text, exc)
                if mapped is None:
                    raise
                raise mapped from None
            if head is not None:
                landed = _landed_commit(api, repo_id, revision, head, message)
                if landed is not None:
                    log.info("%s: the commit landed although its answer was lost", ref_text)
                    return landed
            if attempt >= RETRIES:
                raise _gave_up(ref_text, exc) from None
            log.warning("warning: %s: push failed (%s); retrying in %.1f s (%d/%d)", ref_text, _failed_request(exc),
                        delay, attempt + 1, RETRIES)
            time.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)
    raise AssertionError("unreachable")  # pragma: no cover


def _landed_commit(api, repo_id: str, revision: str | None, head: str, message: str):
    """What `push` needs of our commit (oid, url) if the branch moved from `head` to it; else None."""
    from types import SimpleNamespace

    try:
        commits = api.list_repo_commits(repo_id, revision=revision or "main")
    except Exception:
        return None
    if not commits or commits[0].commit_id == head or commits[0].title != message:
        return None
    if len(commits) < 2 or commits[1].commit_id != head:
        return None
    url = f"{str(api.endpoint).rstrip('/')}/{repo_id}/commit/{commits[0].commit_id}"
    return SimpleNamespace(commit_url=url, oid=commits[0].commit_id, pr_url=None)


def pushed_commit(repo_id: str, token: str | None = None, revision: str | None = None) -> str:
    """SHA of the head of `revision` of a repo (for messages and tests)."""
    return _call(repo_id, _api(token).model_info, repo_id, revision=revision).sha


def check_push_access(repo_id: str, token: str | None = None, *, create_pr: bool = False) -> None:
    """Refuse, before any weight is read, a push the token could not make.

    The token must be valid and not read-only, and its user must own the namespace or belong to
    the organization; an existing repo must be writable (or a pull request asked for).
    """
    from huggingface_hub.errors import HfHubHTTPError

    api = _api(token)
    try:
        me = api.whoami()
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubAccessError(f"--push-to {repo_id}: no valid Hub token ({type(exc).__name__}).",
                             hint="Log in (`hf auth login`), set HF_TOKEN or pass --token (token=...) with write access.") from None
    role = (((me.get("auth") or {}).get("accessToken") or {}).get("role"))
    if role == "read":
        raise HubAccessError(f"--push-to {repo_id}: the token is read-only.",
                             hint="Use a token with write access (--token, HF_TOKEN or `hf auth login`).")
    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else me.get("name")
    orgs = {o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)}
    if namespace != me.get("name") and namespace not in orgs and not create_pr:
        raise HubAccessError(f"--push-to {repo_id}: {me.get('name')} cannot write to the namespace {namespace!r}.",
                             hint=f"Push to {me.get('name')}/{repo_id.split('/')[-1]}, to an organization you belong to, "
                                  "or pass --create-pr (create_pr=True) to open a pull request.")
