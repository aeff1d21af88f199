"""Upload a merged folder to the Hub as one commit (retried without ever making two)."""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..options import check_push_options
from ..sources.hub_calls import HubAccessError, call, retrying
from ..sources.hub_calls import api as hub_api

log = logging.getLogger(__name__)

#: never uploaded: our work files, and dotfiles and `*.env` anywhere in the folder (a `.env` or
#: `.netrc` beside the weights holds secrets, not model files)
IGNORE_PATTERNS = [".cache/**", "*.tmp", ".hf-metagpt*", ".*", "*/.*", "*.env"]


def skipped_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that `push` leaves out (relative paths, sorted)."""
    folder = Path(folder)
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in IGNORE_PATTERNS):
            out.append(rel)
    return sorted(out)


def push(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         create_pr: bool = False, revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a merged model folder to `repo_id` as one commit and return the URL to look at.

    The repo is created when missing (private if asked); `revision` names a branch (created from
    main when missing); `create_pr` opens a pull request instead of committing to the branch.

    Example:
        >>> push("merged/", "me/llama-2-7b-metagpt", private=True)
        'https://huggingface.co/me/llama-2-7b-metagpt'
    """
    check_push_options(repo_id, create_pr=create_pr, revision=revision)
    folder = Path(folder)
    _refuse_offline(repo_id)
    repo_id = full_repo_id(repo_id, token)  # `NAME`: created and pushed as USER/NAME (one repo, not an empty one)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder} is not a model folder (no config.json).",
                         hint="Push the output folder of a merge.")
    if skipped := skipped_files(folder):
        log.info("not uploaded (dotfiles and *.env are never pushed): %s", ", ".join(skipped))
    api = hub_api(token)
    repo_url = call(repo_id, api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        call(f"{repo_id}@{revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
    card = card_for_repo(folder, repo_id)
    message = commit_message or f"Upload MetaGPT merge ({folder.name}) with hf-metagpt"
    info = _upload_one_commit(api, repo_id, folder, message, revision, create_pr, card)
    if create_pr and not getattr(info, "pr_url", None):
        log.warning("warning: nothing changed since the last commit of %s: no pull request opened", repo_id)
    url = getattr(info, "pr_url", None) or str(repo_url)
    if revision and not getattr(info, "pr_url", None):
        url = f"{str(repo_url).rstrip('/')}/tree/{revision}"
    log.info("pushed %s to %s (commit %s)", folder, url, getattr(info, "oid", "?"))
    return url


def _upload_one_commit(api, repo_id: str, folder: Path, message: str, revision: str | None, create_pr: bool,
                       card: bytes | None = None):
    """`upload_folder` as exactly one commit, retried on transient failures.

    The client retries preupload and LFS transfers itself, but not the commit POST. A retry here
    re-runs the whole upload (LFS objects already stored are skipped by the Hub). The commit is
    pinned to the branch head seen before the first attempt (`parent_commit`), so a commit whose
    answer was lost is found (the head moved to a commit with our message) instead of repeated;
    with `create_pr`, a pull request opened since the first attempt whose commit carries our
    message on main's head is ours, and no second one is opened. With hf_xet installed the files
    travel through Xet (xorbs and a shard), the commit names them by sha256 as before.
    """
    ref_text = repo_id if not revision else f"{repo_id}@{revision}"
    head = call(ref_text, lambda: api.model_info(repo_id, revision=None if create_pr else revision).sha)
    prs_before = _pull_requests(api, repo_id) if create_pr else set()
    parent = None if create_pr else head  # a pull request is opened from main's head as the Hub sees it

    def attempt():
        # One "upload" bar over every byte of the commit, in place of huggingface_hub's bar per file
        # (its switch turns those off; our files count what the transfer reads: `_progress`).
        from huggingface_hub.utils import are_progress_bars_disabled

        from .._logging import bars_off
        from .._progress import StageBar, counting_add

        stage = None if are_progress_bars_disabled() else StageBar("upload", _upload_bytes(folder, card))
        done = False
        try:
            with bars_off(True):
                # the folder's files (as upload_folder would send them), with this push's card in place of README.md
                info = api.create_commit(repo_id=repo_id, commit_message=message, revision=revision,
                                         operations=_operations(folder, card, counting_add(stage) if stage else None),
                                         create_pr=create_pr, parent_commit=parent)
            done = True
            return info
        finally:
            if stage is not None:
                stage.close(complete=done)

    def recover(exc):
        if create_pr:
            landed = _opened_pr(api, repo_id, prs_before, head, message)
        else:
            landed = _landed_commit(api, repo_id, revision, head, message)
        if landed is not None:
            log.info("%s: the commit landed although its answer was lost", ref_text)
        return landed

    return retrying(ref_text, attempt, recover=recover, doing="push failed: ")


def _operations(folder: Path, card: bytes | None, add: type | None = None) -> list:
    """What `upload_folder` would add (the same files left out), with README.md's content replaced by
    `card` (when given); `add`: the `CommitOperationAdd` class to use (`_progress.counting_add`)."""
    from huggingface_hub import CommitOperationAdd

    add = add or CommitOperationAdd
    ops = []
    for rel, path in _uploaded(folder):
        ops.append(add(path_in_repo=rel, path_or_fileobj=card if rel == "README.md" and card is not None else str(path)))
    return ops


def _uploaded(folder: Path) -> list[tuple[str, Path]]:
    skipped = set(skipped_files(folder))
    return [(rel, path) for path in sorted(folder.rglob("*"))
            if path.is_file() and (rel := path.relative_to(folder).as_posix()) not in skipped]


def _upload_bytes(folder: Path, card: bytes | None) -> int:
    return sum(len(card) if rel == "README.md" and card is not None else path.stat().st_size
               for rel, path in _uploaded(folder))


def _pull_requests(api, repo_id: str) -> set[str]:
    """The refs of the repo's pull requests now (refs/pr/N)."""
    refs = call(repo_id, api.list_repo_refs, repo_id, include_pull_requests=True)
    return {r.ref for r in (refs.pull_requests or [])}


def _opened_pr(api, repo_id: str, before: set[str], head: str, message: str):
    """What `push` needs of our pull request if a retried push already opened it (its answer was lost).

    A pull request that did not exist before the first attempt, whose head commit carries our
    message on top of the main head we started from, is ours: a retry must not open a second one.
    """
    from types import SimpleNamespace

    try:
        new = sorted(_pull_requests(api, repo_id) - before, key=lambda r: int(r.rsplit("/", 1)[1]))
        for ref in new:
            commits = api.list_repo_commits(repo_id, revision=ref)
            if len(commits) >= 2 and commits[0].title == message and commits[1].commit_id == head:
                base = str(api.endpoint).rstrip("/")
                log.info("%s: the pull request %s was opened although the answer was lost", repo_id, ref)
                return SimpleNamespace(commit_url=f"{base}/{repo_id}/commit/{commits[0].commit_id}",
                                       oid=commits[0].commit_id,
                                       pr_url=f"{base}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}")
    except Exception as exc:  # noqa: BLE001 - the retry then decides
        log.debug("could not list the pull requests of %s: %s", repo_id, exc)
    return None


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


def card_for_repo(folder: Path, repo_id: str) -> bytes | None:
    """The folder's card as it must read in `repo_id` (title, loading code), or None when it needs no change.

    The card `card.build_card` writes has one `# TITLE` line after its front matter and loads the model
    with `from_pretrained("...")`; whatever they name (the local folder, or the repo of an earlier
    push), they name `repo_id` here. The folder itself is never rewritten: the result goes into the
    upload only, so pushing one folder to several repos gives each its own card.
    """
    import re

    path = folder / "README.md"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if "hf-metagpt" not in text:  # not a card of ours: uploaded as it is
        return None
    new = re.sub(r'from_pretrained\("[^"\n]*"', f'from_pretrained("{repo_id}"', text)
    front = re.match(r"---\n.*?\n---\n", new, flags=re.S)
    start = front.end() if front else 0
    new = new[:start] + re.sub(r"^# .*$", f"# {repo_id.split('/')[-1]}", new[start:], count=1, flags=re.M)
    return None if new == text else new.encode("utf-8")


def _refuse_offline(repo_id: str) -> None:
    from ..sources.hub import offline

    if offline():
        raise HubAccessError(f"Pushing to {repo_id} needs the Hub, and HF_HUB_OFFLINE is set.",
                             hint="Merge with --output only, then push the folder later with network access "
                                  "(`hf-metagpt push DIR REPO`), or unset HF_HUB_OFFLINE.")


def full_repo_id(repo_id: str, token: str | None = None) -> str:
    """`NAME` as `USER/NAME` for the token's user (asked with `whoami`); `ORG/NAME` unchanged.

    huggingface_hub creates a bare `NAME` in the token's namespace but uploads to it by the bare
    name, which the Hub does not find: the namespace is resolved before anything is created.
    """
    if "/" in repo_id:
        return repo_id
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        me = call(repo_id, hub_api(token).whoami)
    except LocalTokenNotFoundError:
        raise HubAccessError(f"Pushing to {repo_id} needs a Hub token, and none was found.",
                             hint="Pass --token (token=... in Python), set HF_TOKEN, or run `hf auth login`.") from None
    user = str(me.get("name") or "")
    if not user:
        raise HubAccessError(f"Pushing to {repo_id}: the Hub did not say whose token this is.",
                             hint=f"Give the namespace: ORG/{repo_id}.")
    return f"{user}/{repo_id}"


def check_push_access(repo_id: str, token: str | None = None, *, create_pr: bool = False) -> None:
    """Check, before any weight is read, that `token` may push to `repo_id` (reads nothing but metadata).

    Asks the Hub who the token belongs to (`whoami`) and whether the repo exists. Passes when the
    token may write there: the repo is in the user's namespace or in an org where the user may
    write, and the token is not read-only. With `create_pr`, an existing repo the user can read is
    enough (a pull request needs no write access to the repo, only a token that may write).

    Args:
        repo_id: the target repo, `org/name` (a bare `name` means the user's own namespace).
        token: the token to check (default: `HF_TOKEN` or the `hf auth login` token).
        create_pr: the push will open a pull request.

    Raises:
        HubAccessError: no token, an invalid one, a read-only one, or a namespace it cannot write.

    Example:
        >>> check_push_access("me/llama-2-7b-metagpt")          # passes silently
    """
    from huggingface_hub.errors import LocalTokenNotFoundError, RepositoryNotFoundError

    _refuse_offline(repo_id)
    api = hub_api(token)
    try:
        me = call(repo_id, api.whoami)
    except LocalTokenNotFoundError:
        raise HubAccessError(f"Pushing to {repo_id} needs a Hub token, and none was found.",
                             hint="Pass --token (token=... in Python), set HF_TOKEN, or run `hf auth login`.") from None
    except HubAccessError as exc:
        if "HTTP 401" not in exc.message:
            raise
        raise HubAccessError(f"Pushing to {repo_id}: the Hub token is invalid or expired.",
                             hint="Create a token with write access (Settings → Access Tokens) and pass it "
                                  "with --token (token=...) or HF_TOKEN.") from None
    exists = False
    try:
        call(repo_id, api.repo_info, repo_id, repo_type="model")
        exists = True
    except HubAccessError as exc:
        if not isinstance(exc.__context__, RepositoryNotFoundError) and "not found" not in exc.message:
            raise
    problem = push_refusal(me, repo_id, exists=exists, create_pr=create_pr)
    if problem is not None:
        message, hint = problem
        raise HubAccessError(message, hint=hint)


def push_refusal(whoami: dict[str, Any], repo_id: str, *, exists: bool,
                 create_pr: bool = False) -> tuple[str, str] | None:
    """Why a token cannot push to `repo_id` — (message, hint) — or None when it can (pure).

    `whoami` is the Hub's `/api/whoami-v2` answer: `name`, `orgs` (each with `name` and, on the
    Hub, `roleInOrg`), `auth.accessToken.role` ("read", "write" or "fineGrained", whose scopes
    list `permissions` per `entity`). `exists`: whether the token can see the repo.
    """
    user = str(whoami.get("name") or "")
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    token_info = (whoami.get("auth") or {}).get("accessToken") or {}
    role = token_info.get("role")
    if role == "read":  # a read token writes nothing, a pull request included
        return (f"Pushing to {repo_id}: the token of {user!r} is read-only.",
                "Use a token with write access (--token / token=..., HF_TOKEN or `hf auth login`).")
    if create_pr and exists:
        return None  # reading the repo is enough to open a pull request on it
    pr_hint = " or use --create-pr (create_pr=True) to open a pull request" if exists else ""
    orgs = {str(o.get("name")): o for o in whoami.get("orgs") or [] if isinstance(o, dict)}
    if namespace != user and namespace not in orgs:
        what = "write to" if exists else "create a repo in"
        return (f"Pushing to {repo_id}: {user!r} cannot {what} {namespace!r} (not the user's namespace "
                f"nor one of its organizations).",
                f"Push to {user}/{repo_id.split('/')[-1]}, ask an admin of {namespace!r} for write access"
                + pr_hint + ".")
    if namespace in orgs and str(orgs[namespace].get("roleInOrg", "")).lower() == "read":
        return (f"Pushing to {repo_id}: {user!r} has the read role in the organization {namespace!r}.",
                f"Ask an admin of {namespace!r} for the write role" + pr_hint + ".")
    if role == "fineGrained" and not _fine_grained_can_write(token_info, namespace, repo_id):
        return (f"Pushing to {repo_id}: the fine-grained token of {user!r} has no write permission for "
                f"{namespace!r} or {repo_id!r}.",
                "Grant the token 'Write access to contents/settings of all repos' for that namespace, "
                "or use a write token" + pr_hint + ".")
    return None


def _fine_grained_can_write(token_info: dict[str, Any], namespace: str, repo_id: str) -> bool:
    """A fine-grained token's scopes allow `repo.write` on the namespace or the repo.

    When the answer does not have the shape this reads, the push is let through: a false refusal
    would cost a user more than the upload's own error does.
    """
    fine = token_info.get("fineGrained")
    scoped = fine.get("scoped") if isinstance(fine, dict) else None
    if not isinstance(scoped, list):
        return True
    if "repo.write" in (fine.get("global") or []):
        return True
    for scope in scoped:
        if not isinstance(scope, dict):
            continue
        entity = scope.get("entity") or {}
        if entity.get("name") in (namespace, repo_id) and "repo.write" in (scope.get("permissions") or []):
            return True
    return False
