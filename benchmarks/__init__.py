"""Benchmark code shared by ``launch/bench.py``, the single-GPU issue-5 script and the multi-GPU check.

Not part of the ``usp_attn`` package: these modules time and report, they never
change library behaviour. Run the scripts from the repository root (they put it on
``sys.path`` themselves) or with the repository root on ``PYTHONPATH``.

    timing.py       FLOP counts, random inputs, rotating buffers, CUDA-event / host timers
    report.py       markdown tables and the PNG plot
    kernels.py      the raw attention kernels (aten cuDNN/flash/efficient, Sage1, flash-attn)
    local_ring.py   a single-GPU stand-in for the ring transport (benchmark only)
    peers.py        yunchang and diffusers context parallel, when installed
    issue5_*.py     the sections of gpu_issue5.py
    nccl_layouts.py     the sequence-parallel test scenarios on CUDA + NCCL (launch/multigpu_check.sh)
    process_group.py    torchrun group start-up (NCCL on cuda:LOCAL_RANK, else gloo)
    multigpu_*.py       P4 scaling and P5 peers under torchrun, and the issue-6 report
    comm_bandwidth.py   all-to-all / ring-hop times vs bytes and probed link bandwidth
    safe_defaults.py    cost of the default cross-rank argument checks on 2 GPUs, no host syncs,
                        fp64 through the ring, errors under NCCL (--dry-run: CPU + gloo)
"""
