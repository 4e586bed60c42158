"""remote.log as the git-annex branch publishes it (remotes.parse_remote_log)."""

from __future__ import annotations

from torbridge.annex.remotes import parse_remote_log

U1 = "e68d84bd-dd6c-4ffd-a99e-a030cdf1a84c"
U2 = "d9ac63b6-6ad7-46c9-b3ac-d7966390fe5b"


def test_the_newest_line_per_uuid_wins_whatever_the_order() -> None:
    text = (
        f"{U1} directory=/srv/new encryption=none name=slow type=external timestamp=200s\n"
        f"{U1} directory=/srv/old encryption=none name=slow type=external timestamp=100s\n"
        f"{U2} encryption=none name=rs rsyncurl=host:/x type=rsync timestamp=150s\n"
    )
    log = parse_remote_log(text)
    assert log[U1]["directory"] == "/srv/new"
    assert log[U2] == {"encryption": "none", "name": "rs", "rsyncurl": "host:/x", "type": "rsync"}


def test_escaped_values_are_decoded() -> None:
    # What git-annex 10.20261026 wrote for rsyncurl="/tmp/a b=c&d".
    log = parse_remote_log(f"{U2} name=rs rsyncurl=/tmp/a&32;b=c&38;d timestamp=1s\n")
    assert log[U2]["rsyncurl"] == "/tmp/a b=c&d"


def test_junk_is_skipped_not_fatal() -> None:
    text = f"\n   \nnot-a-line\n{U1} type=directory timestamp=xs\n{U2} =x noequals timestamp=5s\n"
    log = parse_remote_log(text)
    assert log[U1] == {"type": "directory"}  # an unreadable timestamp counts as oldest
    assert log[U2] == {}
    assert "not-a-line" not in log
