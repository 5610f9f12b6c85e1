"""Layer 1, foundations: atomic files, model sources, the routing decision, losses and small helpers.

Nothing here imports another molex layer.
"""
