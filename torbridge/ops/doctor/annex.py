"""Doctor checks of git-annex and the proxy repository (and each endpoint's remote)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from torbridge.annex.host import MIN_GIT_ANNEX, StartupError, check_git_annex, repository_uuid, run
from torbridge.annex.remotes import (
    RemoteError,
    parse_p2p_address,
    parse_remote_log,
    proxied_remote,
    read_annex_log,
    read_remotes,
    read_token,
)
from torbridge.config import OWN_REPOSITORY, Config, Expose
from torbridge.ops.doctor.report import Check, _fail, _ok

YES = ("true", "yes", "on", "1")  # git-annex's yes for a remote.log setting


def _check_git_annex() -> Check:
    try:
        version = check_git_annex()
    except StartupError as e:
        return _fail(
            "git-annex",
            str(e),
            f"install git-annex {MIN_GIT_ANNEX} or newer (Debian backports, or"
            " `pip install git-annex`) where the service's PATH finds it",
        )
    where = _which("git-annex")
    return _ok("git-annex", f"{version} ({where})")


def _which(program: str) -> str:
    return shutil.which(program) or program


def _git(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["git", *args], cwd=repository)


def _check_repository(repository: Path) -> Check:
    name = "repository"
    if not repository.exists():
        return _fail(
            name,
            f"{repository} does not exist",
            f"create it (`git init {repository} && git -C {repository} annex init`), or set"
            " `repository` in the config",
        )
    if not repository.is_dir():
        return _fail(name, f"{repository} is not a directory", "set `repository` in the config")
    if not os.access(repository, os.R_OK | os.X_OK):
        return _fail(
            name,
            f"{repository} is not readable by uid {os.geteuid()}",
            f"give the torbridge user access to it (e.g. `chown -R torbridge: {repository}`)",
        )
    result = _git(repository, "rev-parse", "--git-dir")
    if result.returncode != 0:
        if "dubious ownership" in result.stderr:
            return _fail(
                name,
                f"git refuses {repository}: it belongs to another user (dubious ownership)",
                "run doctor as the repository's owner, the torbridge user"
                " (`sudo -u torbridge torbridge doctor`)",
            )
        return _fail(
            name,
            f"{repository} is not a git repository",
            f"`git init {repository} && git -C {repository} annex init`",
        )
    try:
        uuid = repository_uuid(repository)
    except StartupError as e:
        return _fail(name, str(e), f"run `git annex init` in {repository}")
    return _ok(name, f"{repository} (git-annex uuid {uuid})")


def _check_expose(config: Config, expose: Expose) -> Check:
    name = f"expose {expose.name}"
    repo = config.repository
    if expose.remote == OWN_REPOSITORY:
        return _ok(name, f"port {expose.port}: the proxy's own repository")
    remote = read_remotes(repo).get(expose.remote)
    if remote is None:
        return _fail(
            name,
            f"the repository has no remote named {expose.remote!r}",
            f"link it (`git -C {repo} annex p2p --link --name {expose.remote}`, or `git remote"
            " add`), or correct `remote` in this [[expose]]",
        )
    if not remote.proxy:
        return _fail(
            name,
            f"remote {expose.remote!r} is not proxied",
            f"`git -C {repo} config remote.{expose.remote}.annex-proxy true`",
        )
    if not remote.uuid:
        return _fail(
            name,
            f"remote {expose.remote!r} has no annex-uuid",
            f"`git -C {repo} annex sync {expose.remote}` (or link it again) so git-annex"
            " learns its UUID",
        )
    try:
        proxied_remote(repo, expose.remote)  # whatever else the daemon insists on
        address = parse_p2p_address(remote.url or "")
    except RemoteError as e:
        return _fail(
            name,
            str(e),
            f"link the remote again: `git -C {repo} annex p2p --link --name {expose.remote}`",
        )
    if address is None:
        published = parse_remote_log(read_annex_log(repo, "remote.log")).get(remote.uuid)
        if published is not None and published.get("autoenable", "").lower() in YES:
            return _fail(
                name,
                f"remote.log publishes autoenable=true for {expose.remote!r}: a client that"
                " clones this repository and runs `git annex init` enables it itself and"
                " reaches its storage directly, not through the bridge",
                f"`git -C {repo} annex enableremote {expose.remote} autoenable=false` (with any"
                " setting it asks for, such as directory=)",
                severity="warning",
            )
        return _ok(
            name,
            f"port {expose.port}: remote {expose.remote} (uuid {remote.uuid}),"
            " through git-annex-shell"
            + (
                "; a special remote in remote.log: clients that merge the git-annex branch"
                " verify it once (token add prints how)"
                if published is not None
                else ""
            ),
        )
    try:
        read_token(repo, address)
    except RemoteError as e:
        return _fail(
            name,
            str(e),
            f"link it on the proxy so git-annex stores its token: `git -C {repo} annex p2p"
            f" --link --name {expose.remote}`",
        )
    return _ok(
        name,
        f"port {expose.port}: remote {expose.remote} (uuid {remote.uuid}) at {address},"
        " token present",
    )
