"""The git-annex host: the proxy's repository and what git and git-annex say about it.

Start-up checks (host.py), remotes and clusters from git config and the
git-annex branch (remotes.py), the location log and preferred content as
git-annex answers them (query.py, preferred.py), and the location log
writer (locationlog.py). Nothing here knows of sessions or sockets: the
daemon's trio layer (torbridge/server/) and the transports call in here,
never the other way round.
"""
