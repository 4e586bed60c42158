"""The proxy repository's refs, watched once for every NOTIFYCHANGE session.

git-annex's own server (``RemoteDaemon/Transport/P2PGeneric.hs``) starts an
inotify watch on ``.git/refs`` for each authenticated connection, and answers
NOTIFYCHANGE with ``CHANGED sha...``: the new values of the refs written
since that connection last heard, collected for 50 ms after the first one.
The client (the remotedaemon, the assistant) then runs ``git fetch`` unless
it already has one of those commits, and sends NOTIFYCHANGE again.

Here ONE watcher serves every watching session of the daemon, and needs no
git-annex-shell. It runs only while at least one session watches (so a push
with nobody watching costs nothing), and keeps the current refs as one
snapshot (``git for-each-ref``). Each session keeps the snapshot it last
reported (its baseline); its CHANGED is the difference, so no change is
lost while a client is busy fetching between two NOTIFYCHANGEs.

How a change is noticed: inotify (through ctypes: the stdlib has no
binding) on ``refs/`` and every directory under it, plus ``packed-refs``
and ``reftable/`` in the git directory, as git-annex watches. An event
starts a new snapshot after a 50 ms settle. inotify costs nothing while
nothing changes and answers in milliseconds, where polling would cost a
process or a tree walk per interval, and seconds of latency. If inotify
cannot be had (no instances or watches left), the watcher polls
``git for-each-ref`` every ``POLL_INTERVAL`` seconds instead and says so in
the log. Either way a snapshot is also taken every ``RECHECK`` seconds, so
a lost event (a queue overflow) delays a notice, never loses it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import trio

log = logging.getLogger("torbridge.refwatch")

SETTLE = 0.05  # seconds to collect more ref writes after the first (as git-annex)
POLL_INTERVAL = 2.0  # without inotify: seconds between snapshots
RECHECK = 60.0  # with inotify: a snapshot at least this often all the same
SNAPSHOT_TIMEOUT = 120.0  # git for-each-ref must answer by then
RESTART_DELAY = 5.0  # after a failed snapshot
MAX_SHAS = 100  # per CHANGED; git-annex buffers at most 100 changes per connection

Refs = Mapping[str, str]  # refname -> sha

# --- inotify through ctypes -------------------------------------------------------------

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class InotifyUnavailable(OSError):
    pass


class Inotify:
    """An inotify descriptor: directories watched, and a wait for their events."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            self._add = libc.inotify_add_watch
            init = libc.inotify_init1
        except (OSError, AttributeError) as e:
            raise InotifyUnavailable(str(e)) from None
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.dirs: dict[int, Path] = {}  # watch descriptor -> directory

    def add(self, directory: Path) -> None:
        """Watch ``directory`` (again is harmless); gone already is ignored."""
        wd = self._add(self.fd, os.fsencode(directory), _MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                return
            raise InotifyUnavailable(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self.dirs[wd] = directory

    async def events(self) -> list[tuple[Path | None, int, str]]:
        """The next batch of events: (directory or None, mask, name)."""
        await trio.lowlevel.wait_readable(self.fd)
        return self.read_now()

    def read_now(self) -> list[tuple[Path | None, int, str]]:
        """The events already queued, without waiting (none: empty)."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        out: list[tuple[Path | None, int, str]] = []
        at = 0
        while at + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
            raw = data[at + _EVENT.size : at + _EVENT.size + length]
            at += _EVENT.size + length
            name = os.fsdecode(raw.rstrip(b"\0"))
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
            out.append((self.dirs.get(wd), mask, name))
        return out

    def close(self) -> None:
        os.close(self.fd)


# --- the watcher ------------------------------------------------------------------------


def new_shas(before: Refs, after: Refs) -> tuple[str, ...]:
    """What CHANGED says: the values of refs written since ``before``.

    Deleted refs are not reported (git-annex reports only writes); each sha
    once, at most ``MAX_SHAS``.
    """
    shas: dict[str, None] = {}
    for ref, sha in after.items():
        if before.get(ref) != sha:
            shas[sha] = None
            if len(shas) == MAX_SHAS:
                break
    return tuple(shas)


def parse_for_each_ref(output: bytes) -> dict[str, str]:
    refs: dict[str, str] = {}
    for line in output.decode("utf-8", "surrogateescape").splitlines():
        sha, _, ref = line.partition(" ")
        if sha and ref:
            refs[ref] = sha
    return refs


class RefWatch:
    """One session's view: the refs as it last reported them."""

    def __init__(self, watcher: RefWatcher, baseline: Refs | None) -> None:
        self._watcher = watcher
        self.baseline = baseline

    async def changed(self) -> tuple[str, ...]:
        """Wait until the refs differ from the baseline; the new shas.

        No deadline: a client may wait for hours, as with git-annex.
        """
        while True:
            snapshot, newer = await self._watcher.current()
            if self.baseline is None:
                self.baseline = snapshot  # the first NOTIFYCHANGE since the watch began
            shas = new_shas(self.baseline, snapshot)
            self.baseline = snapshot
            if shas:
                return shas
            await newer.wait()


class RefWatcher:
    """The daemon's one watch on the proxy repository's refs.

    ``run`` is a daemon task; it watches only while some session is inside
    ``watch()``, and stops when the last one leaves.
    """

    def __init__(
        self,
        repository: Path,
        *,
        settle: float = SETTLE,
        poll_interval: float = POLL_INTERVAL,
        recheck: float = RECHECK,
        use_inotify: bool = True,
    ) -> None:
        self.repository = repository
        self.settle = settle
        self.poll_interval = poll_interval
        self.recheck = recheck
        self.use_inotify = use_inotify
        self.users = 0  # sessions inside watch()
        self.snapshots = 0  # git for-each-ref runs, for tests and status
        self.starts = 0  # times the watch was started
        self.mechanism: str | None = None  # "inotify" or "poll" while watching
        self._snapshot: dict[str, str] | None = None  # the refs, while watching
        self._newer = trio.Event()  # set when a newer snapshot is published
        self._wanted = trio.Event()
        self._scope: trio.CancelScope | None = None

    # --- for sessions ----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """For ``torbridge status``."""
        return {
            "sessions": self.users,
            "mechanism": self.mechanism,
            "starts": self.starts,
            "snapshots": self.snapshots,
        }

    def peek(self) -> Refs | None:
        """The refs as last seen, if the watch is running (costs nothing)."""
        return self._snapshot

    @contextlib.contextmanager
    def watch(self, baseline: Refs | None = None) -> Iterator[RefWatch]:
        """A session's watch; ``baseline``: refs it already knows (``peek()``)."""
        self.users += 1
        self._wanted.set()
        try:
            yield RefWatch(self, baseline)
        finally:
            self.users -= 1
            if self.users == 0 and self._scope is not None:
                self._scope.cancel()

    async def current(self) -> tuple[Refs, trio.Event]:
        """The refs now, and an event set once newer ones are published."""
        while self._snapshot is None:
            await self._newer.wait()
        return self._snapshot, self._newer

    # --- the daemon task ---------------------------------------------------------------

    async def run(self) -> None:
        """Watch while anyone wants it, until cancelled."""
        while True:
            await self._wanted.wait()
            with trio.CancelScope() as scope:
                self._scope = scope
                if self.users == 0:
                    scope.cancel()
                try:
                    self.starts += 1
                    await self._watch()
                except Exception as e:  # whatever it is, the daemon serves on
                    log.warning("watching the refs of %s: %s", self.repository, e)
                    await trio.sleep(RESTART_DELAY)
            self._scope = None
            self._snapshot = None
            self.mechanism = None
            if self.users == 0:
                self._wanted = trio.Event()
                log.info("ref watch stopped: no session waits for changes")

    async def _watch(self) -> None:
        git_dir = await self._git_dir()
        inotify: Inotify | None = None
        if self.use_inotify:
            try:
                inotify = Inotify()
                self._add_dirs(inotify, git_dir)
            except InotifyUnavailable as e:
                if inotify is not None:
                    inotify.close()
                inotify = None
                log.warning(
                    "no inotify (%s); polling the refs every %gs instead", e, self.poll_interval
                )
        self.mechanism = "poll" if inotify is None else "inotify"
        log.info("ref watch started (%s) on %s, for NOTIFYCHANGE", self.mechanism, git_dir)
        try:
            # Watches first, then the snapshot: a write in between is seen twice,
            # never missed.
            await self._publish()
            while True:
                if inotify is None:
                    await trio.sleep(self.poll_interval)
                else:
                    with trio.move_on_after(self.recheck):
                        await self._wait_for_ref_event(inotify, git_dir)
                    self._add_dirs(inotify, git_dir)  # new ref directories
                await self._publish()
        finally:
            if inotify is not None:
                inotify.close()

    async def _wait_for_ref_event(self, inotify: Inotify, git_dir: Path) -> None:
        """Return once a ref may have been written, and the writes have settled."""
        while not any(self._about_refs(git_dir, *e) for e in await inotify.events()):
            pass
        # Collect the rest of a push's writes, as git-annex does.
        await trio.sleep(self.settle)
        while inotify.read_now():
            pass

    @staticmethod
    def _about_refs(git_dir: Path, directory: Path | None, mask: int, name: str) -> bool:
        if mask & IN_Q_OVERFLOW:
            return True  # events were lost: look
        if directory is None or name.endswith(".lock"):
            return False
        if directory == git_dir:
            return name == "packed-refs"
        return True  # refs/..., reftable/...

    @staticmethod
    def _add_dirs(inotify: Inotify, git_dir: Path) -> None:
        inotify.add(git_dir)
        for top in (git_dir / "refs", git_dir / "reftable"):
            for path, _dirs, _files in os.walk(top):
                inotify.add(Path(path))

    async def _git_dir(self) -> Path:
        with trio.fail_after(SNAPSHOT_TIMEOUT):
            result = await trio.run_process(
                ["git", "-C", str(self.repository), "rev-parse", "--absolute-git-dir"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode(errors="replace").strip() or "no git dir")
        return Path(os.fsdecode(result.stdout.strip()))

    async def _publish(self) -> None:
        """Take a snapshot; wake the sessions if the refs changed."""
        with trio.fail_after(SNAPSHOT_TIMEOUT):
            result = await trio.run_process(
                [
                    "git",
                    "-C",
                    str(self.repository),
                    "for-each-ref",
                    "--format=%(objectname) %(refname)",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        self.snapshots += 1
        if result.returncode != 0:
            raise RuntimeError(
                "git for-each-ref: " + result.stderr.decode(errors="replace").strip()
            )
        refs = parse_for_each_ref(result.stdout)
        if refs == self._snapshot:
            return
        self._snapshot = refs
        newer, self._newer = self._newer, trio.Event()
        newer.set()
