"""Who may do what on the local Hub: tokens, organizations and the Hub's access rules for repos."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .common import NAME_RE, HubError, Limits
from .storage import Repo, Store


class Access:
    """Tokens and organizations, and the Hub's answers for reads and writes of a repo.

    Private repos answer 401 (no token) or 404 (another user) on reads, like the Hub, so neither
    learns whether the repo exists; writes need a token of the namespace's owner or org member (403).
    Gated repos show their info, tree and refs to everyone, and their files only to the owner and
    the users granted access: others get 401 (no token) or 403 with ``X-Error-Code: GatedRepo``.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, Iterable[str]] | None = None):
        self.tokens: dict[str, str] = dict(tokens or {})
        self.orgs: dict[str, set[str]] = {k: set(v) for k, v in (orgs or {}).items()}

    def add_token(self, token: str, user: str) -> None:
        if not NAME_RE.match(user):
            raise ValueError(f"Invalid user name {user!r}")
        self.tokens[token] = user

    def add_org(self, org: str, members: Iterable[str]) -> None:
        self.orgs.setdefault(org, set()).update(members)

    def authenticate(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def can_write_ns(self, user: str | None, ns: str) -> bool:
        return user is not None and (user == ns or user in self.orgs.get(ns, ()))

    def can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or self.can_write_ns(user, repo.id.split("/")[0])

    def can_download(self, user: str | None, repo: Repo) -> bool:
        """Whether `user` may read the files of `repo` (its licence gate, if any, is passed)."""
        return (self.can_read(user, repo) and (not repo.gated or user in repo.granted
                                                or self.can_write_ns(user, repo.id.split("/")[0])))

    def check_download(self, user: str | None, repo: Repo, base_url: str) -> None:
        """Raise the Hub's GatedRepo answer when `user` has not been granted access to a gated repo."""
        if self.can_download(user, repo):
            return
        what = f"{repo.type} {repo.id}"
        if user is None:  # the Hub's wording for each case, which its client shows as is
            raise HubError(401, f"Access to {what} is restricted. You must have access to it and be authenticated "
                                "to access it. Please log in.", "GatedRepo")
        raise HubError(403, f"Access to {what} is restricted and you are not in the authorized list. "
                            f"Visit {base_url}/{repo.url_id} to ask for access.", "GatedRepo")

    @staticmethod
    def require_user(user: str | None) -> str:
        if user is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to do this")
        return user

    def repo_for_read(self, store: Store, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = store.repos.get((repo_type, repo_id))
        if repo is None or not self.can_read(user, repo):
            # Like the Hub: unauthenticated callers get 401, others 404; neither learns if it exists.
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def repo_for_write(self, store: Store, repo_type: str, repo_id: str, user: str | None) -> Repo:
        self.require_user(user)
        repo = self.repo_for_read(store, repo_type, repo_id, user)
        if not self.can_write_ns(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}")
        return repo


@dataclass
class Features:
    """How the Hub answers file downloads (switchable while serving; see `LocalHub.set_storage`).

    `cdn`: LFS files redirect (302) to a signed URL of the storage side, another origin, which must
    not receive the token. `xet`: LFS files are Xet-backed (X-Xet-Hash, ``Link: rel="xet-auth"``,
    CAS reconstruction), as new uploads on the Hub are; the 302 to the storage side stays for
    clients without hf_xet. `resolve_cache`: regular files redirect (307) to
    ``/api/resolve-cache/{type}s/{id}/{commit}/{path}`` on the Hub itself, as huggingface.co answers
    them. `storage_url`: the storage side's base URL.
    """

    cdn: bool = False
    xet: bool = False
    #: regular (non-LFS) files answer a 307 to a relative ``/api/resolve-cache/...`` URL, as on the Hub
    resolve_cache: bool = False
    storage_url: str = ""


@dataclass(frozen=True)
class Context:
    """What every endpoint needs: the store, the access rules and the key that signs upload URLs."""

    store: Store
    access: Access
    secret: bytes
    limits: Limits = Limits()
    features: Features = field(default_factory=Features)

    def read(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        return self.access.repo_for_read(self.store, repo_type, repo_id, user)

    def write(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        return self.access.repo_for_write(self.store, repo_type, repo_id, user)

    def download(self, repo: Repo, user: str | None, base_url: str) -> None:
        """Raise unless `user` may read `repo`'s files (see `Access.check_download`)."""
        self.access.check_download(user, repo, base_url)

    def lfs_readable(self, user: str | None, oid: str, size: int | None = None) -> bool:
        """Whether `user` may use this LFS object: a repo whose files they can read holds it.

        Files of a gated repo count only for users with access: else committing a pointer to one
        of its blobs into a repo of one's own would hand the file out (see `Store.lfs_readable`).
        """
        return self.store.lfs_readable(oid, size, lambda repo: self.access.can_download(user, repo))
