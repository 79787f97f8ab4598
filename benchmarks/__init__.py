"""usp_attn's benchmark suite: ``python benchmarks/run.py --list`` (see BENCHMARKS.md).

Not part of the ``usp_attn`` package: these modules time and report, they never change library
behaviour. One entry point (run.py) runs named parts; every part returns rows in one format
(suite.py) and one reporter (report.py) writes them as markdown, JSON and a PNG.

    run.py            entry point: the parts, the one-GPU and multi-GPU sets, process groups
    suite.py          the run's Context and the row format
    report.py         markdown tables, JSON, PNG; merges the results of several runs
    timing.py         FLOP counts, random inputs, CUDA-event / host timers, interleaved timing
    kernels.py        the attention candidates (raw kernels and layers), one entry each
    environment.py    env, ceilings
    correctness.py    every candidate and layer vs fp64
    device_checks.py  no host syncs; torch.compile
    kernel_speed.py   kernels (P1)
    layer_overhead.py layer-overhead (P2)
    ring_hops.py      ring-hops (P3), with local_ring.py's in-memory ring exchange
    scaling.py        scaling (P4): the attention layer on 1..N GPUs, every layout
    peers.py          peers (P5): yunchang and diffusers context parallel
    model_step.py     model-step: built-in DiT and diffusers Wan transformer forwards
    communication.py  all-to-all / ring-hop transfers vs link bandwidth
    layout_tests.py   the sequence-parallel test scenarios on the devices (NCCL)
"""
