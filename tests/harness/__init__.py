"""The test harness: what every tier (tests/e2e, nodes, load, tor, ops, core)
and the benches (``python -m bench.bench_NAME``) import, each job in one place.

Running things
- ``process``: ``run`` (every command with a timeout, its output in every
  failure), ``Result``/``CommandError``, ``wait_for`` (the one poll with a
  deadline), ``descendants`` (a process tree from /proc).

The stock client and its repositories
- ``annex``: ``AnnexEnv`` (isolated HOME and PATH around the git-annex
  wheel), ``AnnexRepo``/``Client``, ``whereis_uuids``, ``object_keys``,
  ``object_contents``.
- ``client``: the stock client beyond one command: the -J workflow,
  ``Batch``/``BatchCopy`` (``--batch``), ``AnnexProcess`` (in the
  background), ``RemoteDaemon``, and what ``--debug`` shows it got.

The daemon
- ``bridge``: ``Bridge``, the one daemon under test (config with optional
  ``[limits]``/``[tor]``/other tables, process, tokens, status, metrics,
  clean stop), ``Expose``, ``Address``, ``READY_LINE``, ``TorLine``.
- ``session``: the P2P protocol by hand: ``RawSession`` (blocking),
  ``AsyncSession`` (trio), ``SessionClosed``.
- ``fixtures``: the shared pytest fixtures (``annex_env``, ``proxy_repo``,
  ``make_bridge``, ``client``...) and the failure-report hook; a tier's
  conftest.py imports them.

Peers behind the daemon
- ``nodes``: git-annex nodes served by ``remotedaemon`` (p2p, tor through a
  stand-in SOCKS server, local), their network, ``Setup``.
- ``tbnode``: the ``git-annex-p2p-tbnode`` program those nodes use (runs as
  a file: standard library only).
- ``clusters``: a git-annex cluster of nodes behind the daemon.
- ``fakes``: the fast tier's scripted P2P server, in-memory transport and
  one-token admission (no processes).

Load
- ``load``: many trio sessions doing a request mix, a pre-auth flood,
  statistics; ``profiles``: the CI and long profiles (``TORBRIDGE_LOAD``).

Tor (a private Tor network on 127.0.0.1 only)
- ``tor``: the private network namespace and its SOCKS forwarder (``python
  -m tests.harness.tor forward``), ``NetnsAnnexEnv``, ``TorBridge``, tor
  restarts, descriptor uploads, the leak check, ``require_tor``,
  ``socks_connect``, ``control`` (one command on a tor's control port), echo
  servers.
- ``worlds``: ``WorldBase`` and ``TorWorld`` (bridge and node onions);
  ``clusterworld``: a cluster of tor-annex nodes; ``balanceworld``: two
  hosts behind an Onionbalance frontend. All three stand on ``WorldBase``.

Ops
- ``ops``: plain git, a linked tor-annex remote without network, a fake tor
  control port.
"""
