"""Issue 6: the sequence-parallel layers' communication vs its byte counts and the measured links.

    torchrun --standalone --nproc-per-node N benchmarks/comm_bandwidth.py --json FILE [--cpu-dry-run]

For every group size d > 1 dividing N, the N ranks form N/d contiguous groups that all
work at once (as the layers' groups would). Per d:

probes (large messages: what NCCL reaches on these links)
  all_to_all   ``all_to_all_single`` of P MiB per rank
  p2p ring     every rank sends P MiB to the next rank of its group and receives from the
               previous one in one ``batch_isend_irecv`` (what a ring hop does)
at the attention shape (B, H, S, D) = (1, 40, 75600, 128) bf16, as Ulysses-d / ring-d run it
  ulysses q,k,v  ``ulysses_comm.sequence_to_heads`` of q, k, v shards ``[B, S/d, H, D]``
                 (one fused all-to-all; the packing copy is included)
  ulysses out    ``ulysses_comm.heads_to_sequence`` of the output ``[B, S, H/d, D]``
  ring hop       one ``RingExchange.start`` + ``wait`` of a K and a V block ``[B, S/d, H, D]``
and once for the whole world: ``all_reduce`` of P MiB, reported as the nccl-tests bus
bandwidth 2(N-1)/N x bytes / time, for reference.

Bandwidth = bytes each rank sends to *other* ranks / time (its own all-to-all block stays
local). "of probe" = achieved / the same pattern's probe at this d; "of link" = achieved /
the best bandwidth any probe reached here, i.e. the fraction of what one GPU's links
delivered at best. Times: slowest rank's median of CUDA-event-timed calls after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.process_group import init_benchmark_group  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.timing import time_fn  # noqa: E402
from usp_attn.distributed.ring_comm import RingExchange  # noqa: E402
from usp_attn.distributed.ulysses_comm import heads_to_sequence, sequence_to_heads  # noqa: E402

GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16, probe_mib=256, warmup=3, reps=20)
CPU = dict(shape=(1, 8, 256, 32), dtype=torch.float32, probe_mib=1, warmup=1, reps=3)
HEADERS = ["pattern", "group size d", "MiB sent per rank", "median ms", "GB/s per rank", "of probe", "of link", "note"]


class Bench:
    def __init__(self, config: dict, device: torch.device) -> None:
        self.config, self.device = config, device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def seconds(self, fn, *args) -> float:
        """Slowest rank's median seconds per call of ``fn(*args)``."""
        dist.barrier()
        timing = time_fn(fn, [args], warmup=self.config["warmup"], reps=self.config["reps"], device=self.device)
        t = torch.tensor([timing.median], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def empty(self, numel: int, dtype=None) -> torch.Tensor:
        return torch.randn(numel, device=self.device).to(dtype or self.config["dtype"])


def groups_of(world: int, d: int) -> list[list[int]]:
    return [list(range(g, g + d)) for g in range(0, world, d)]


def measure(bench: Bench, d: int) -> list[dict]:
    cfg, dev = bench.config, bench.device
    rank = bench.rank
    members = groups_of(bench.world, d)
    mine = next(g for g in members if rank in g)
    group = None
    for g in members:  # every rank creates every group, in the same order
        made = dist.new_group(g)
        if rank in g:
            group = made
    pos = mine.index(rank)
    exchange = RingExchange(tuple(mine), pos, group, datetime.timedelta(minutes=2))
    elem = torch.tensor([], dtype=cfg["dtype"]).element_size()
    rows = []

    # probes
    probe_bytes = cfg["probe_mib"] * 2**20
    n = probe_bytes // elem // d * d
    src, dst = bench.empty(n), bench.empty(n)
    t = bench.seconds(lambda: dist.all_to_all_single(dst, src, group=group))
    sent = n * elem * (d - 1) / d
    rows.append(dict(pattern="probe all_to_all", d=d, bytes=sent, seconds=t, note=f"{cfg['probe_mib']} MiB per rank"))
    shape = (n,)

    def ring_once(x):
        exchange.start([x], [(shape, x.dtype)])
        return exchange.wait()

    t = bench.seconds(ring_once, src)
    rows.append(dict(pattern="probe p2p ring", d=d, bytes=n * elem, seconds=t, note=f"{cfg['probe_mib']} MiB per rank"))

    # the layers' own transfers at the attention shape
    b, h, s, hd = cfg["shape"]
    s_shard = s // d
    gen = torch.Generator(device=dev).manual_seed(rank)
    q, k, v = (torch.randn(b, s_shard, h, hd, generator=gen, device=dev).to(cfg["dtype"]) for _ in range(3))
    lengths = (s_shard,) * d
    t = bench.seconds(lambda: sequence_to_heads([q, k, v], lengths, group))
    rows.append(dict(pattern="ulysses q,k,v all-to-all", d=d, bytes=3 * q.numel() * elem * (d - 1) / d, seconds=t,
                     note=f"shards [{b}, {s_shard}, {h}, {hd}] x3, packing copy included"))
    out = torch.randn(b, s_shard * d, h // d, hd, generator=gen, device=dev).to(cfg["dtype"])
    t = bench.seconds(lambda: heads_to_sequence(out, lengths, pos, group))
    rows.append(dict(pattern="ulysses output all-to-all", d=d, bytes=out.numel() * elem * (d - 1) / d, seconds=t,
                     note=f"[{b}, {s_shard * d}, {h // d}, {hd}]"))
    like = [(k.shape, k.dtype)] * 2

    def hop():
        exchange.start([k, v], like)
        return exchange.wait()

    t = bench.seconds(hop)
    rows.append(dict(pattern="ring hop (K and V)", d=d, bytes=2 * k.numel() * elem, seconds=t,
                     note=f"blocks [{b}, {s_shard}, {h}, {hd}] x2"))
    dist.destroy_process_group(group)
    return rows


def all_reduce_probe(bench: Bench) -> dict:
    cfg = bench.config
    elem = torch.tensor([], dtype=cfg["dtype"]).element_size()
    x = bench.empty(cfg["probe_mib"] * 2**20 // elem)
    t = bench.seconds(lambda: dist.all_reduce(x))
    n = bench.world
    # nccl-tests convention: bus bandwidth = 2 (n-1)/n * bytes / time
    return dict(pattern="probe all_reduce (bus bw)", d=n, bytes=2 * (n - 1) / n * x.numel() * elem, seconds=t,
                note=f"{cfg['probe_mib']} MiB, whole world")


def fractions(rows: list[dict]) -> None:
    for r in rows:
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else None
    link = max((r["gbps"] for r in rows if r["pattern"].startswith("probe") and r["gbps"]), default=None)
    probe_of = {"ulysses q,k,v all-to-all": "probe all_to_all", "ulysses output all-to-all": "probe all_to_all",
                "ring hop (K and V)": "probe p2p ring"}
    for r in rows:
        probe = next((p for p in rows if p["pattern"] == probe_of.get(r["pattern"]) and p["d"] == r["d"]), None)
        r["of_probe"] = r["gbps"] / probe["gbps"] if probe and probe["gbps"] and r["gbps"] else None
        r["of_link"] = r["gbps"] / link if link and r["gbps"] else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON (rank 0)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU with gloo")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        parser.error("no CUDA GPU here; use --cpu-dry-run for tiny sizes on CPU")
    device = init_benchmark_group(cuda, datetime.timedelta(minutes=3))
    bench = Bench(GPU if cuda else CPU, device)
    t0 = time.perf_counter()
    rows = []
    if bench.world > 1:
        rows.append(all_reduce_probe(bench))
        for d in (d for d in range(2, bench.world + 1) if bench.world % d == 0):
            rows += measure(bench, d)
        fractions(rows)
    if bench.rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
        title = f"communication: {bench.world} x {name}, {str(bench.config['dtype']).replace('torch.', '')}"
        table = markdown_table(HEADERS, [[r["pattern"], r["d"], r["bytes"] / 2**20, r["seconds"] * 1e3, r["gbps"],
                                          r.get("of_probe"), r.get("of_link"), r["note"]] for r in rows])
        print(f"## {title}\n\n{table if rows else 'one rank: no communication to measure'}\n\n"
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"title": title, "world": bench.world, "rows": rows,
                                                           "seconds": time.perf_counter() - t0}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
