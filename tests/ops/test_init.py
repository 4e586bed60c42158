"""`torbridge init`: a config written from the repository's proxied remotes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.ops import add_tor_remote, git
from torbridge.config import ConfigError, Limits, load_config
from torbridge.ops.init import InitError, init_config

pytestmark = pytest.mark.annex


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "torbridge.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_exposes_the_repository_and_its_proxied_remotes(
    make_repo: Callable[[str], Path], tmp_path: Path
) -> None:
    repo = make_repo("hub")
    add_tor_remote(repo, "zeta")  # proxied
    git(repo, "remote", "add", "alpha", str(tmp_path / "alpha"))  # proxied, git-annex-shell
    git(repo, "config", "remote.alpha.annex-uuid", "11111111-2222-4333-8444-555555555555")
    git(repo, "config", "remote.alpha.annex-proxy", "true")
    add_tor_remote(repo, "middle", proxy=False)  # not proxied: not exposed

    text = init_config(
        repo,
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "sock",
        tor_control="unix:/run/tor/control",
    )

    config = load_config(_write(tmp_path, text))
    assert [(e.name, e.remote, e.port) for e in config.expose] == [
        ("hub", ".", 5000),
        ("alpha", "alpha", 5001),
        ("zeta", "zeta", 5002),
    ]
    assert config.repository == repo.resolve()
    assert config.state_dir == tmp_path / "state"
    assert config.socket_dir == tmp_path / "sock"
    assert config.socket_mode == 0o660
    assert config.tor.control == "unix:/run/tor/control"
    assert config.limits == Limits()
    assert "middle" not in text


def test_exposes_the_clusters_it_is_a_gateway_for(
    make_repo: Callable[[str], Path], tmp_path: Path
) -> None:
    repo = make_repo("hub")
    add_tor_remote(repo, "node1")
    git(repo, "annex", "initcluster", "mycluster")
    text = init_config(repo, state_dir=tmp_path / "state", socket_dir=tmp_path / "sock")
    config = load_config(_write(tmp_path, text))
    assert [(e.name, e.remote, e.port) for e in config.expose] == [
        ("hub", ".", 5000),
        ("node1", "node1", 5001),
        ("mycluster", "mycluster", 5002),
    ]


def test_header_says_what_to_do_next(make_repo: Callable[[str], Path], tmp_path: Path) -> None:
    text = init_config(
        make_repo("hub"), state_dir=tmp_path / "s", socket_dir=tmp_path / "k", tor_control=None
    )
    header = text[: text.index("\nrepository = ")]
    assert header.startswith("# Written by `torbridge init` for the git-annex repository\n")
    assert all(line.startswith("#") or not line for line in header.splitlines())
    for step in (
        "/etc/torbridge/torbridge.toml",
        "torbridge doctor",
        "systemctl enable --now torbridge",
        "torbridge token add NAME",
        "git annex p2p --link",
        "remote.NAME.annex-proxy=true",
        '# them as an onion service, set control = "unix:/run/tor/control"',
    ):
        assert step in header, step
    config = load_config(_write(tmp_path, text))
    assert [e.remote for e in config.expose] == ["."]
    assert config.tor.control is None


def test_defaults_are_the_service_paths(make_repo: Callable[[str], Path], tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, init_config(make_repo("hub"))))
    assert config.state_dir == Path("/var/lib/torbridge")
    assert config.socket_dir == Path("/run/torbridge")
    assert config.tor.control is None


def test_notes_a_proxied_remote_without_uuid(
    make_repo: Callable[[str], Path], tmp_path: Path
) -> None:
    repo = make_repo("hub")
    git(repo, "remote", "add", "fresh", str(tmp_path / "fresh"))
    git(repo, "config", "remote.fresh.annex-proxy", "true")
    text = init_config(repo, state_dir=tmp_path / "s", socket_dir=tmp_path / "k", tor_control=None)
    assert "#   - remote 'fresh' has no annex-uuid yet: `git annex sync fresh`" in text
    assert [e.remote for e in load_config(_write(tmp_path, text)).expose] == [".", "fresh"]


def test_endpoint_names_are_made_valid_and_unique(
    make_repo: Callable[[str], Path], tmp_path: Path
) -> None:
    repo = make_repo("my annex")  # a space is not allowed in an endpoint name
    git(repo, "remote", "add", "my-annex", str(tmp_path / "x"))
    git(repo, "config", "remote.my-annex.annex-uuid", "11111111-2222-4333-8444-555555555555")
    git(repo, "config", "remote.my-annex.annex-proxy", "true")
    text = init_config(repo, state_dir=tmp_path / "s", socket_dir=tmp_path / "k", tor_control=None)
    config = load_config(_write(tmp_path, text))
    assert [(e.name, e.remote) for e in config.expose] == [
        ("my-annex", "."),
        ("my-annex-2", "my-annex"),
    ]


def test_refuses_a_plain_git_repository(tmp_path: Path) -> None:
    repo = tmp_path / "plain"
    repo.mkdir()
    git(repo, "init", "-q")
    with pytest.raises(InitError) as excinfo:
        init_config(repo, state_dir=tmp_path / "s", socket_dir=tmp_path / "k", tor_control=None)
    assert str(excinfo.value) == (
        f"{repo} is not a git-annex repository (no annex.uuid): run `git annex init`"
    )
    assert isinstance(excinfo.value, ConfigError)  # the CLI prints it as one line


def test_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InitError, match="no such directory"):
        init_config(tmp_path / "nope", state_dir=tmp_path, socket_dir=tmp_path, tor_control=None)


def test_refuses_a_bad_tor_control(make_repo: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(InitError) as excinfo:
        init_config(
            make_repo("hub"),
            state_dir=tmp_path / "s",
            socket_dir=tmp_path / "k",
            tor_control="not a port",
        )
    assert str(excinfo.value) == (
        "the config would not load: key \"control\" in tor: 'not a port' is neither"
        ' "HOST:PORT" nor "unix:/path/to/socket"'
    )
