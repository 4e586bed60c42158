"""Ways to reach a P2P peer, all behind one interface (base.py)."""
