"""Doctor checks of directories and files: socket_dir, state_dir, the tokens."""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from torbridge.config import UNIX_PATH_MAX, Config
from torbridge.ops.doctor.report import Check, _fail, _ok
from torbridge.ops.doctor.systemd import SYSTEMD_MADE_DIRS, TOR_GROUP
from torbridge.protocol.permissions import GitAccess
from torbridge.tokens import FILE_NAME as TOKENS_FILE
from torbridge.tokens import TokenError, TokenStore
from torbridge.tor.onion import KEY_FILE


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def _missing_dir(name: str, path: Path, create_mode: str) -> Check:
    """A check for a directory that does not exist yet: can the daemon create it?"""
    made_by = SYSTEMD_MADE_DIRS.get(path)
    if made_by is not None:
        return _ok(name, f"{path} does not exist yet; systemd creates it ({made_by}) at start")
    ancestor = _nearest_existing(path)
    fix = f"create it: `install -d -o torbridge -m {create_mode} {path}`"
    if not ancestor.is_dir():
        return _fail(name, f"{path} cannot be created: {ancestor} is not a directory", fix)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return _fail(
            name, f"{path} cannot be created: {ancestor} is not writable by uid {os.geteuid()}", fix
        )
    return _ok(name, f"{path} does not exist yet; torbridge creates it at start")


def _check_socket_dir(config: Config) -> Check:
    name = "socket_dir"
    path = config.socket_dir
    paths = [config.socket_path(expose) for expose in config.expose]
    too_long = [str(p) for p in paths if len(os.fsencode(p)) > UNIX_PATH_MAX]
    if too_long:
        return _fail(
            name,
            f"socket path {too_long[0]} is longer than {UNIX_PATH_MAX} bytes",
            "choose a shorter socket_dir (such as /run/torbridge) or shorter endpoint names",
        )
    if not os.path.lexists(path):
        return _missing_dir(name, path, "0750")
    if not path.is_dir():
        return _fail(name, f"{path} is not a directory", "remove it, or choose another socket_dir")
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        return _fail(
            name,
            f"{path} is world-writable (mode {_mode(st)}): anyone could replace the sockets",
            f"`chmod o-w {path}` (2750, group {TOR_GROUP}, lets tor in and nobody else)",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(
            name,
            f"{path} is not writable by uid {os.geteuid()}",
            f"`chown torbridge {path}`, or choose another socket_dir",
        )
    return _ok(name, f"{path} (mode {_mode(st)}) is writable")


def _check_tor_access(config: Config) -> Check | None:
    """Can Debian's tor (group debian-tor) reach the endpoint sockets? A warning only."""
    name = "tor socket access"
    try:
        tor_gid = grp.getgrnam(TOR_GROUP).gr_gid
    except KeyError:
        return None  # not Debian's tor: nothing we can tell
    path = config.socket_dir
    if not path.is_dir():
        return _ok(name, f"{path} does not exist yet; check again once the service runs")
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    # A socket's group is the directory's if it is setgid, else the daemon's own.
    socket_gid = st.st_gid if mode & stat.S_ISGID else os.getegid()
    dir_ok = bool(mode & stat.S_IXOTH) or (st.st_gid == tor_gid and bool(mode & stat.S_IXGRP))
    rw = stat.S_IRGRP | stat.S_IWGRP
    socket_ok = (config.socket_mode & 0o006) == 0o006 or (
        socket_gid == tor_gid and config.socket_mode & rw == rw
    )
    if dir_ok and socket_ok:
        return _ok(name, f"the {TOR_GROUP} group can reach the sockets in {path}")
    return _fail(
        name,
        f"tor (group {TOR_GROUP}) cannot reach the sockets in {path}"
        f" (directory mode {_mode(st)}, group {st.st_gid}; socket_mode {config.socket_mode:04o})",
        f'`chgrp {TOR_GROUP} {path} && chmod 2750 {path}` with socket_mode "0660" (the'
        " shipped unit does this at start); matters only if tor runs as Debian's system tor",
        severity="warning",
    )


def _check_state_dir(path: Path) -> Check:
    name = "state_dir"
    if not os.path.lexists(path):
        return _missing_dir(name, path, "0700")
    if not path.is_dir():
        return _fail(name, f"{path} is not a directory", "remove it, or choose another state_dir")
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        return _fail(
            name,
            f"{path} has mode {_mode(st)}: others can look at the tokens and the onion key",
            f"`chmod 0700 {path}`",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(
            name, f"{path} is not writable by uid {os.geteuid()}", f"`chown -R torbridge: {path}`"
        )
    key = path / KEY_FILE
    if key.exists() and stat.S_IMODE(key.stat().st_mode) & 0o077:
        return _fail(
            name,
            f"the onion service key {key} has mode {_mode(key.stat())}",
            f"`chmod 0600 {key}`",
        )
    return _ok(name, f"{path} (mode {_mode(st)})")


def _check_tokens(state_dir: Path, own_endpoints: Sequence[str] = ()) -> Check:
    name = "tokens"
    path = state_dir / TOKENS_FILE
    if not os.path.lexists(path):
        return _ok(name, f"no tokens yet ({path}); make one with `torbridge token add NAME`")
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        return _fail(name, f"{path} has mode {_mode(st)}", f"`chmod 0600 {path}`")
    try:
        tokens = TokenStore(state_dir).list()
    except TokenError as e:
        return _fail(
            name,
            str(e),
            f"restore {path} from a backup, or move it away and issue the tokens again",
        )
    # What each token may do to the proxy's git; rewrite ones by name.
    levels = [info.git_access(own_endpoints) for info in tokens]
    counts = ", ".join(f"{levels.count(level)} {level.label}" for level in GitAccess)
    rewriters = [
        info.name for info, level in zip(tokens, levels, strict=True) if level is GitAccess.REWRITE
    ]
    may_rewrite = f"; may rewrite git history: {', '.join(rewriters)}" if rewriters else ""
    return _ok(
        name, f"{len(tokens)} token(s) in {path} (mode {_mode(st)}); git {counts}{may_rewrite}"
    )
