"""What a local Hub's owner does outside the HTTP API: rename repos, canonical names, gating.

`LocalHub` takes these methods from `RepoAdmin`; each acts on the started hub's store.
"""

from __future__ import annotations

from .access import Context
from .common import NAME_RE, REPO_TYPES, HubError, repo_id_of
from .storage import Repo


class RepoAdmin:
    """Repo settings as the Hub's web pages change them: renames, canonical IDs, gated access."""

    context: Context  # the started hub's store and access rules (`LocalHub.context`)

    def rename_repo(self, repo_id: str, new_id: str, *, repo_type: str = "model") -> None:
        """Rename a repo like the Hub's settings page: its old URLs answer a 307 to the new ones."""
        ns, _, name = new_id.partition("/")
        try:
            new_id = repo_id_of(ns, name)
        except HubError as err:
            raise ValueError(err.message) from None
        self.context.store.rename(self._repo(repo_id, repo_type), new_id)

    def add_canonical(self, name: str, repo_id: str, *, repo_type: str = "model") -> None:
        """Serve `repo_id` under a canonical name without namespace too (`gpt2` -> `openai-community/gpt2`),
        through a 307 as the Hub does."""
        if not NAME_RE.match(name):
            raise ValueError(f"Invalid canonical name {name!r}")
        self._repo(repo_id, repo_type)
        self.context.store.add_alias(repo_type, name, repo_id)

    # ---- gated repos
    def set_gated(self, repo_id: str, mode: str | bool = "manual", *, repo_type: str = "model") -> None:
        """Gate a repo like a licence-gated model on the Hub (`mode` "auto" or "manual"), or ungate it (False).

        Its info, tree and refs stay visible to all; its files only to the owner (namespace or org
        members) and users given `grant_access`. Both modes need a grant here: nobody accepts
        conditions on a page of the local Hub. Kept across restarts.
        """
        if mode is not False and mode not in ("auto", "manual"):
            raise ValueError(f"Gated mode must be 'auto', 'manual' or False, not {mode!r}")
        self.context.store.set_gated(self._repo(repo_id, repo_type), mode)

    def grant_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Let `user` download the files of a gated repo (as if its licence were accepted and approved)."""
        self.context.store.set_access(self._repo(repo_id, repo_type), self._user(user), True)

    def revoke_access(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Undo `grant_access` (the owner keeps access)."""
        self.context.store.set_access(self._repo(repo_id, repo_type), self._user(user), False)

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        if repo_type not in REPO_TYPES.values():
            raise ValueError(f"Unknown repo type {repo_type!r}: use one of {', '.join(REPO_TYPES.values())}")
        ns, _, name = repo_id.partition("/")
        try:
            repo_id = repo_id_of(ns, name)
        except HubError as err:
            raise ValueError(err.message) from None
        repo = self.context.store.repos.get((repo_type, repo_id))
        if repo is None:
            raise ValueError(f"No {repo_type} repo {repo_id} on this local Hub: create it first")
        return repo

    @staticmethod
    def _user(user: str) -> str:
        if not NAME_RE.match(user):
            raise ValueError(f"Invalid user name {user!r}")
        return user
