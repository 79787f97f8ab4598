"""Ring attention: each rank's queries against every ring rank's key/value block, K/V passed around the ring.

Read in this order:

    plan.py          which kernel calls each hop makes (contiguous and zigzag layouts, causal or not):
                     the ring's work as data, used by the forward, the backward and the tests
    exchange.py      the neighbour exchange of one hop (P2P, overlapped with the hop's attention)
    merge.py         the exact log-sum-exp merge of partial results (merge_triton.py: the fused kernel)
    forward.py       the forward loop
    backward.py      the backward: the same calls in reverse, dK/dV travelling with their blocks
"""
