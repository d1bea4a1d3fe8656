"""Face image quality beyond the MagFace norm: chosen quality columns, SER-FIQ, EDC.

``columns``: which per-image quality a command uses (a column of the embeddings or a joined
file). ``serfiq``: SER-FIQ (stochastic embedding robustness) from dropout passes of a
network's head. ``edc``: error-versus-discard curves of several quality measures on the same
pairs, with partial areas, the random-order baseline and the oracle. Plain numpy (torch only
inside ``serfiq``'s head passes).
"""
