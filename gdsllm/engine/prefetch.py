"""The in-process prefetch window: streamed units read ahead into W rotating slots while the
device computes, for `gdsllm.LLM` (the service's I/O worker does the same across processes,
driven by gdsllm.engine.planner's StreamSchedule).

    pf = Prefetch(streamed_units, slots, loader, device)   # starts reading at once
    buf = pf.take(unit)            # waits for its read (usually already done): its slot's bytes
    runner.run_unit(unit, unit_tensors(unit, buf))
    pf.release()                   # its kernels are issued: the slot may be refilled after them
    pf.realign()                   # after a pass that stopped midway: the next take is unit 0 again
    pf.close()

Streamed units form one endless cyclic sequence (pass p, streamed unit j -> sequence number
p*m + j, slot seq % W), as in the service: a weight does not depend on the sampled token, so the
next pass's first units are read while this pass still computes, and the disk never waits for
sampling. One reader thread reads in order; sequence number s may be read once s - W has been
released, and on CUDA once the kernels issued before that release have finished (an event per
slot), so a slot is never overwritten under a running kernel. A failed read is raised from the
`take` that wanted it, and the window starts over at the next pass. With `cyclic=False` the units
are read once, in order (gdsllm.torch's `stream_layers`).
"""
from __future__ import annotations

import atexit
import threading
import weakref

import torch

from gdsllm.format.metadata import UnitMeta


_OPEN: "weakref.WeakSet[Prefetch]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every reader before the interpreter goes: a daemon thread still inside a read (KvikIO
    is C++) when the runtime tears down ends the process with std::terminate (seen on the H200
    when a script left an LLM open)."""
    for pf in list(_OPEN):
        pf.close()


class Prefetch:
    def __init__(self, units: list[UnitMeta], slots: list[torch.Tensor], loader, device: torch.device,
                 cyclic: bool = True):
        if not units or not slots:
            raise ValueError("Prefetch needs at least one streamed unit and one slot")
        self.units, self.slots, self.loader, self.cyclic = list(units), list(slots), loader, cyclic
        self.cuda = device.type == "cuda"
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.reads = 0  # units read so far (for tests and logs)
        self._begin(0)
        _OPEN.add(self)

    @property
    def window(self) -> int:
        return len(self.slots)

    def _begin(self, seq: int) -> None:
        """Start the reader at sequence number `seq` (all slots free)."""
        self.next_take = self.released = self.next_read = seq
        self.ready: dict[int, object] = {}  # seq -> its weights, or the exception its read raised
        self.events: dict[int, torch.cuda.Event | None] = {}  # slot -> the work to wait for
        self.stopping = False
        self.thread = threading.Thread(target=self._read_loop, name="gdsllm-prefetch", daemon=True)
        self.thread.start()

    def _read_loop(self) -> None:
        w, m = len(self.slots), len(self.units)
        while True:
            with self.cond:
                while not self.stopping and self.next_read >= self.released + w:
                    self.cond.wait()
                if self.stopping or (not self.cyclic and self.next_read >= m):
                    return
                seq = self.next_read
                event = self.events.pop(seq % w, None)
            if event is not None:
                event.synchronize()  # the slot's previous unit's kernels have finished
            unit, slot = self.units[seq % m], self.slots[seq % w]
            try:
                self.loader.load(unit, slot)
                result: object = slot[:unit.nbytes]
            except BaseException as e:  # raised by the take that wants this unit
                result = e
            with self.cond:
                self.ready[seq] = result
                self.next_read += 1
                self.reads += 1
                self.cond.notify_all()
            if isinstance(result, BaseException):
                return

    def take(self, unit: UnitMeta) -> torch.Tensor:
        """The bytes of `unit` (its slot, `unit.nbytes` long), the next unit of the cycle, once its
        read has landed; valid until `release()`."""
        with self.cond:
            seq = self.next_take
            if not self.cyclic and seq >= len(self.units):
                raise RuntimeError(f"prefetch: take({unit.name}) after every unit was taken")
            want = self.units[seq % len(self.units)]
            if want.index != unit.index:
                raise RuntimeError(f"prefetch: asked for unit {unit.name}, the window holds {want.name} next")
            if self.released != seq:
                raise RuntimeError(f"prefetch: take({unit.name}) before the previous unit's release")
            while seq not in self.ready:
                self.cond.wait()
            result = self.ready.pop(seq)
            self.next_take += 1
        if isinstance(result, BaseException):
            self.realign()  # the next pass starts over, reading this unit again
            raise result
        return result  # type: ignore[return-value]

    def release(self) -> None:
        """The unit last taken has had its work issued; its slot may be refilled once that work is
        done (on CUDA, an event recorded now on the current stream)."""
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        with self.cond:
            if self.released == self.next_take:
                raise RuntimeError("prefetch: release without take")
            self.events[self.released % len(self.slots)] = event
            self.released += 1
            self.cond.notify_all()

    def realign(self) -> None:
        """After a pass that stopped midway (or a failed read): drop what was read ahead and start
        the window over at the first streamed unit of the next pass."""
        self._stop()
        m = len(self.units)
        self._begin(-(-self.next_take // m) * m)

    def _stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            if self.thread is not threading.current_thread():  # a collector may run anywhere
                self.thread.join()
            self.thread = None
        if self.cuda:  # nothing may still read a slot that the next reader overwrites
            torch.cuda.synchronize()

    def close(self) -> None:
        self._stop()
        _OPEN.discard(self)
