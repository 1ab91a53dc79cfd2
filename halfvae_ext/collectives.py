"""The collectives a sharded table needs, each with a timeout that names what timed out: an
all-gather of ints and objects, an all-to-all of rows and the plan that routes rows to their
owners and back, an all-reduce and a barrier."""
from __future__ import annotations

import datetime
import math
import time

import torch
import torch.distributed as dist

__all__ = ["Comm", "CollectiveError", "Plan", "timedelta_of"]


class CollectiveError(RuntimeError):
    """A collective that failed or did not complete within its timeout on this rank (a peer
    died, hung or called another collective). ``what``: the collective; ``rank``, ``world``."""

    def __init__(self, message: str, what: str = "", rank: int = -1, world: int = 0):
        super().__init__(message)
        self.what, self.rank, self.world = what, rank, world


def timedelta_of(timeout) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, "
                         f"got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


class Comm:
    """The collectives of one table on one group, each waited for at most `timeout`. owner: who
    runs them, the first words of the error message."""

    def __init__(self, group, timeout: datetime.timedelta, device: torch.device,
                 owner: str = "ShardedLatentTable"):
        self.group, self.timeout, self.device, self.owner = group, timeout, device, owner
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # Counters for benchmarks: payload bytes this rank sent to other ranks, seconds spent in
        # collectives (launch to completion) and in the owner's kernels.
        self.bytes_sent = 0
        self.exchange_s = 0.0
        self.kernel_s = 0.0

    def _wait(self, work, what: str):
        t0 = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses with their own text
            raise CollectiveError(f"{self.owner}: {what} failed on rank {self.rank} of "
                                  f"{self.world} within the timeout of "
                                  f"{self.timeout.total_seconds():g} s (a rank died, hung or "
                                  f"called a different collective; resume from the last "
                                  f"checkpoint): {e}", what, self.rank, self.world) from e
        finally:
            self.exchange_s += time.perf_counter() - t0

    def all_gather_ints(self, values: list[int]) -> torch.Tensor:
        """[world, len(values)] int64 on the CPU."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), "all_gather")
        self.bytes_sent += t.numel() * 8 * (self.world - 1)
        return torch.stack(out).cpu()

    def all_gather_objects(self, obj) -> list:
        # Only on the error path: a pickle exchange, no timeout argument of its own, so bounded by
        # the process group's timeout.
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_to_all(self, send: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int]) -> torch.Tensor:
        """Rows of `send` (grouped by destination, send_counts[d] to rank d) exchanged; returns
        the rows received, grouped by source."""
        send = send.contiguous()
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        if self.world == 1:
            return recv.copy_(send)
        self._wait(dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group,
                                          async_op=True), "all_to_all")
        row_bytes = send.element_size() * math.prod(send.shape[1:])
        self.bytes_sent += (sum(send_counts) - send_counts[self.rank]) * row_bytes
        return recv

    def all_reduce_sum(self, t: torch.Tensor, what: str = "all_reduce"):
        if self.world > 1:
            self._wait(dist.all_reduce(t, group=self.group, async_op=True), what)
            self.bytes_sent += t.numel() * t.element_size()  # per rank, ring all-reduce ~2x(W-1)/W
        return t

    def barrier(self, what: str = "barrier"):
        if self.world > 1:
            self._wait(dist.barrier(group=self.group, async_op=True), what)


class Plan:
    """Where a call's ids go: owner-sorted order, per-owner counts, and what each rank receives."""

    def __init__(self, order, send_counts, recv_counts):
        self.order, self.send_counts, self.recv_counts = order, send_counts, recv_counts

    def to_owners(self, comm: Comm, rows: torch.Tensor) -> torch.Tensor:
        """Rows aligned with the caller's ids -> the rows of the ids this rank owns, rank-major."""
        return comm.all_to_all(rows.index_select(0, self.order), self.send_counts,
                               self.recv_counts)

    def to_callers(self, comm: Comm, rows: torch.Tensor) -> torch.Tensor:
        """The inverse: rows computed by the owner -> aligned with the caller's ids."""
        back = comm.all_to_all(rows, self.recv_counts, self.send_counts)
        out = torch.empty_like(back)
        out.index_copy_(0, self.order, back)
        return out
