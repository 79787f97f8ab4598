"""Ulysses: an all-to-all turns sequence shards into head shards of the whole segment, and back.

Read in this order:

    heads.py         how heads are divided among the U ranks (GQA repetition, padding when H % U != 0)
    comm.py          the all-to-alls, with their autograd (each one's backward is the inverse all-to-all)
    steps.py         one call's steps: replicated text rows kept out of the all-to-all, zigzag reordering
"""
