"""Architecture hooks, the reference: the Arch base class and the built-in models.

The same models as the C++ engine's (csrc/gmem/arch.cpp), written out plainly.  A
subclass of :class:`Arch` overrides any of the five KVM hooks; the underscore methods
are the model's own notifications and contract checks, which the built-ins use.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from gmem._consts import PRIVATE
from gmem.reference._args import u64
from gmem.reference._config import config_names

if TYPE_CHECKING:
    from gmem.reference.guest_memfd import GuestMemfd

PMD_PAGES = 512  # one 2 MiB RMP entry


@dataclass(frozen=True)
class Violation:
    """A broken contract: which arch, which rule, where (None: not applicable), and what."""

    arch: str
    rule: str
    index: int | None
    pfn: int | None
    detail: str

    def __str__(self) -> str:
        index = "-" if self.index is None else str(self.index)
        pfn = "-" if self.pfn is None else f"{self.pfn:#x}"
        return f"{self.arch}: {self.rule} at index {index}, pfn {pfn}: {self.detail}"


class Arch:
    """Subclass and override hooks; unset hooks do nothing.

    ``config`` (PREPARE, FREE, FREE_ON_SHARED_CONVERSION) and ``batched`` are read once,
    when the GuestMemfd is created; ``file`` is the GuestMemfd this arch serves.
    """

    config: Any = frozenset()
    batched: bool = False
    NAME: ClassVar[str | None] = None
    # What a conversion does to the pages it converts: "keep", "zero" or "garble".
    CONTENTS: ClassVar[str] = "keep"
    CONTENTS_RULE: ClassVar[str] = "contents-as-expected"

    def __init__(self) -> None:
        self._file_ref: weakref.ref[GuestMemfd] | None = None
        self._op_file: GuestMemfd | None = None  # set while an operation of the file runs
        self.contents_touched = False  # set by a hook that wrote page contents

    @property
    def file(self) -> GuestMemfd | None:
        """The file this arch serves (held weakly, as the engine does: no reference cycle)."""
        return None if self._file_ref is None else self._file_ref()

    @file.setter
    def file(self, f: GuestMemfd) -> None:
        self._file_ref = weakref.ref(f)

    @property
    def name(self) -> str:
        own = type(self).__dict__.get("NAME")
        return own if own is not None else type(self).__name__

    @property
    def stats(self) -> dict[str, int]:
        return {}

    # The KVM hooks: they do nothing but check what a direct call passes them.  Each has
    # the merged kernel's name and the June 2026 thread's: make_private is prepare and
    # reclaim is free_folio; a subclass may define either (the file calls make_private
    # or reclaim, whose base versions call prepare or free_folio).
    def make_private(self, index: int, pfn: int, nr_pages: int) -> None:
        self._model("prepare")(self, index, pfn, nr_pages)

    def reclaim(self, start_pfn: int, end_pfn: int) -> None:
        self._model("free_folio")(self, start_pfn, end_pfn)

    def _model(self, name: str) -> Any:
        """The built-in model's own ``name`` (as the engine's T::prepare): never a Python
        override, so super().make_private() from an overriding prepare cannot recurse."""
        for klass in type(self).__mro__:
            if klass.__module__ == __name__ and name in vars(klass):
                return vars(klass)[name]
        raise AttributeError(name)

    def invalidate_range(self, start: int, end: int, kinds: int) -> None:
        self._kinds(start, end, kinds)

    def post_populate(self, index: int, pfn: int, token: int | None = None) -> None:
        self._populate_args(index, pfn, token)

    def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
        self._prepare_args(index, pfn, nr_pages)

    def make_shared(self, start_pfn: int, end_pfn: int) -> None:
        self._pfns(start_pfn, end_pfn)

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        self._pfns(start_pfn, end_pfn)

    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        self._kinds(start, end, kinds)

    def invalidate_end(self, start: int, end: int) -> None:
        self._range(start, end)

    # The model's notifications and contract checks (not KVM hooks).
    def _guest_mapped(self, index: int, pfn: int, nr: int, private: bool) -> None:
        pass

    def _attributes_set(self, start: int, end: int, attrs: int) -> None:
        pass

    def _check_freed(self, pfn: int, nr: int, out: list[Violation]) -> None:
        pass

    def _check_host_reach(self, index: int, pfn: int, out: list[Violation]) -> None:
        pass

    # "hugetlb": a huge folio is about to be split into order-0 folios, or its pieces
    # were just merged back into one (SNP PSMASH / 2 MiB restore, TDX demote / promote).
    def _split_folio(self, index: int, pfn: int, order: int) -> None:
        pass

    def _merge_folio(self, index: int, pfn: int, order: int) -> None:
        pass

    def _check_state(self, f: GuestMemfd, out: list[Violation]) -> None:
        pass

    @property
    def _file(self) -> GuestMemfd:
        f = self._op_file if self._op_file is not None else self.file
        if f is None or f.closed:
            raise ValueError("self: this Arch serves no open file")
        return f

    # Argument checks of the built-in models' hooks, which Python may call directly: a
    # direct call that fails changes nothing.  (The file always passes good arguments.)
    def _pfns(
        self, start_pfn: Any, end_pfn: Any, names: tuple[str, str] = ("start_pfn", "end_pfn")
    ) -> tuple[int, int]:
        s, e = u64(start_pfn, names[0]), u64(end_pfn, names[1])
        pm = self._file.physmem
        if not pm.base_pfn <= s < pm.end_pfn:
            raise ValueError(
                f"{names[0]}: must be in [{pm.base_pfn:#x}, {pm.end_pfn:#x}) (the file's "
                f"PhysMem), got {s:#x}"
            )
        if not s < e <= pm.end_pfn:
            raise ValueError(f"{names[1]}: must be in ({s:#x}, {pm.end_pfn:#x}], got {e:#x}")
        return s, e

    def _range(self, start: Any, end: Any) -> tuple[int, int]:
        s, e = u64(start, "start"), u64(end, "end")
        self._file._check_range(s, e)
        return s, e

    def _prepare_args(self, index: Any, pfn: Any, nr_pages: Any) -> tuple[int, int, int]:
        i, p, n = u64(index, "index"), u64(pfn, "pfn"), u64(nr_pages, "nr_pages")
        f = self._file
        if i >= f.nr_pages:
            raise ValueError(f"index: must be < nr_pages ({f.nr_pages}), got {i}")
        if not 1 <= n <= f.nr_pages - i:
            raise ValueError(f"nr_pages: must be in 1..{f.nr_pages - i} (the file's end), got {n}")
        self._pfns(p, p + n, ("pfn", "nr_pages"))
        return i, p, n

    def _populate_args(self, index: Any, pfn: Any, token: Any) -> tuple[int, int, int | None]:
        i, p = u64(index, "index"), u64(pfn, "pfn")
        t = None if token is None else u64(token, "token")
        f = self._file
        if i >= f.nr_pages:
            raise ValueError(f"index: must be < nr_pages ({f.nr_pages}), got {i}")
        self._pfns(p, p + 1, ("pfn", "pfn"))
        return i, p, t

    def _kinds(self, start: Any, end: Any, kinds: Any) -> tuple[int, int, int]:
        s, e, k = u64(start, "start"), u64(end, "end"), u64(kinds, "kinds")
        self._range(s, e)
        if not 1 <= k <= 3:
            raise ValueError(
                f"kinds: must be FILTER_SHARED (1), FILTER_PRIVATE (2) or both (3), got {k}"
            )
        return s, e, k


class SwProtected(Arch):
    NAME = "sw_protected"


class SNP(Arch):
    """AMD SEV-SNP: the RMP assigns PFNs to the guest in 4 KiB or 2 MiB entries."""

    NAME = "snp"
    config = frozenset({"PREPARE", "FREE", "FREE_ON_SHARED_CONVERSION", "POPULATE"})
    CONTENTS = "garble"
    RMP_SHARED, RMP_4K, RMP_2M = 0, 1, 2

    def __init__(self) -> None:
        super().__init__()
        self.rmp_updates = self.psmash = self.cache_flushes = self.launch_updates = 0
        self.rmp_2m_restores = 0

    @property
    def stats(self) -> dict[str, int]:
        return {
            "cache_flushes": self.cache_flushes,
            "launch_updates": self.launch_updates,
            "psmash": self.psmash,
            "rmp_2m_restores": self.rmp_2m_restores,
            "rmp_updates": self.rmp_updates,
        }

    def _split_folio(self, index: int, pfn: int, order: int) -> None:
        """PSMASH every 2 MiB RMP entry of the folio being split."""
        pm = self._file.physmem
        for p in range(pfn, pfn + (1 << order) - PMD_PAGES + 1, PMD_PAGES):
            a = p - pm.base_pfn
            if pm.rmp.range_has(a, a + PMD_PAGES, self.RMP_2M):
                pm.rmp.store(a, a + PMD_PAGES, self.RMP_4K)
                self.psmash += 1

    def _merge_folio(self, index: int, pfn: int, order: int) -> None:
        """Each 2 MiB region of the merged (wholly private) folio: one 2 MiB entry again."""
        pm = self._file.physmem
        for p in range(pfn, pfn + (1 << order) - PMD_PAGES + 1, PMD_PAGES):
            a = p - pm.base_pfn
            if not pm.rmp.range_has(a, a + PMD_PAGES, self.RMP_2M):
                pm.rmp.store(a, a + PMD_PAGES, self.RMP_2M)
                self.rmp_updates += 1
                self.rmp_2m_restores += 1

    def _check_state(self, f: GuestMemfd, out: list[Violation]) -> None:
        pm = f.physmem
        for index, pfn, nr, _ in f._extents(0, f.nr_pages):
            for a, b, v in pm.rmp.runs(pfn - pm.base_pfn, pfn + nr - pm.base_pfn).tolist():
                i0, i1 = index + a + pm.base_pfn - pfn, index + b + pm.base_pfn - pfn
                if v == self.RMP_2M and not f._attrs.range_has(i0, i1, PRIVATE):
                    out.append(
                        Violation(
                            self.name,
                            "rmp-2m-covers-shared-page",
                            i0,
                            a + pm.base_pfn,
                            f"an assigned 2 MiB RMP entry covers a shared page of [{i0}, {i1})",
                        )
                    )

    def post_populate(self, index: int, pfn: int, token: int | None = None) -> None:
        """LAUNCH_UPDATE: the page is assigned in the RMP (4 KiB) and measured."""
        index, pfn, token = self._populate_args(index, pfn, token)
        pm = self._file.physmem
        if pm.rmp.load(pfn - pm.base_pfn) == self.RMP_SHARED:
            pm.rmp.store(pfn - pm.base_pfn, pfn - pm.base_pfn + 1, self.RMP_4K)
            self.rmp_updates += 1
        self.launch_updates += 1

    def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
        index, pfn, nr_pages = self._prepare_args(index, pfn, nr_pages)
        pm = self._file.physmem
        rmp, base, end = pm.rmp, pm.base_pfn, pfn + nr_pages
        p = pfn
        while p < end:
            if (
                nr_pages >= PMD_PAGES
                and p % PMD_PAGES == 0
                and p + PMD_PAGES <= end
                and rmp.range_has(p - base, p - base + PMD_PAGES, self.RMP_SHARED)
            ):
                rmp.store(p - base, p - base + PMD_PAGES, self.RMP_2M)
                self.rmp_updates += 1
                p += PMD_PAGES
                continue
            stop = min(end, (p // PMD_PAGES + 1) * PMD_PAGES)
            for a, b, v in rmp.runs(p - base, stop - base).tolist():
                if v == self.RMP_SHARED:
                    rmp.store(a, b, self.RMP_4K)
                    self.rmp_updates += b - a
            p = stop

    def rmp_make_shared(self, start_pfn: int, end_pfn: int) -> None:
        pm = self._file.physmem
        rmp, base = pm.rmp, pm.base_pfn
        for edge in (start_pfn, end_pfn - 1):  # PSMASH a 2 MiB entry covered only in part
            region = edge & ~(PMD_PAGES - 1)
            partial = region < start_pfn or region + PMD_PAGES > end_pfn
            if (
                partial
                and region >= base
                and region + PMD_PAGES <= pm.end_pfn
                and rmp.range_has(region - base, region - base + PMD_PAGES, self.RMP_2M)
            ):
                rmp.store(region - base, region - base + PMD_PAGES, self.RMP_4K)
                self.psmash += 1
        entries = 0
        for a, b, v in rmp.runs(start_pfn - base, end_pfn - base).tolist():
            if v == self.RMP_4K:
                entries += b - a
            elif v == self.RMP_2M:
                entries += (b - a) // PMD_PAGES
        self.rmp_updates += entries
        self.cache_flushes += entries
        rmp.store(start_pfn - base, end_pfn - base, self.RMP_SHARED)

    def make_shared(self, start_pfn: int, end_pfn: int) -> None:
        self.rmp_make_shared(*self._pfns(start_pfn, end_pfn))

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        self.rmp_make_shared(*self._pfns(start_pfn, end_pfn))

    def _check_freed(self, pfn: int, nr: int, out: list[Violation]) -> None:
        pm = self._file.physmem
        for a, b, v in pm.rmp.runs(pfn - pm.base_pfn, pfn + nr - pm.base_pfn).tolist():
            if v != self.RMP_SHARED:
                out.append(
                    Violation(
                        self.name,
                        "free-pool-page-unassigned",
                        None,
                        a + pm.base_pfn,
                        f"{b - a} pages go back to the free pool still assigned in the RMP",
                    )
                )

    def _check_host_reach(self, index: int, pfn: int, out: list[Violation]) -> None:
        pm = self._file.physmem
        if pm.rmp.load(pfn - pm.base_pfn) != self.RMP_SHARED:
            out.append(
                Violation(
                    self.name,
                    "host-reaches-unassigned-pages",
                    index,
                    pfn,
                    "the host maps a page assigned in the RMP (RMP fault)",
                )
            )


class TDX(Arch):
    """TDX: no gmem hooks; a conversion destroys the page, which then reads zero.  The
    2 MiB Secure EPT leaves are modelled: demoted before a zap that cuts them or a split
    of their folio (every ``demote_busy_every``-th attempt fails BUSY and is retried),
    promoted when a huge folio is merged."""

    NAME = "tdx"
    config = frozenset({"POPULATE"})
    CONTENTS = "zero"
    CONTENTS_RULE = "converted-page-reads-zero"

    def __init__(self, demote_busy_every: Any = 0) -> None:
        super().__init__()
        self._busy_every = u64(demote_busy_every, "demote_busy_every")
        self._attempts = 0
        self._leaves_2m: set[int] = set()  # file index of each 2 MiB S-EPT leaf
        self.pages_added = self.demotes = self.demote_busy = self.promotes = 0

    demote_busy_every = property(lambda self: self._busy_every)

    @property
    def stats(self) -> dict[str, int]:
        return {
            "demote_busy": self.demote_busy,
            "demotes": self.demotes,
            "pages_added": self.pages_added,
            "promotes": self.promotes,
        }

    def post_populate(self, index: int, pfn: int, token: int | None = None) -> None:
        """PAGE.ADD: the TDX module copies the page into the TD and measures it."""
        self._populate_args(index, pfn, token)
        self.pages_added += 1

    def _guest_mapped(self, index: int, pfn: int, nr: int, private: bool) -> None:
        if private and nr >= PMD_PAGES:
            self._leaves_2m.update(range(index, index + nr - PMD_PAGES + 1, PMD_PAGES))

    def _demote(self, region: int) -> None:
        if self._busy_every:
            self._attempts += 1
            if self._attempts % self._busy_every == 0:
                self.demote_busy += 1  # TDX_OPERAND_BUSY: retried with the vCPUs kicked out
        self.demotes += 1
        self._leaves_2m.discard(region)

    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        """A zap of private mappings: leaves inside go, leaves the range cuts are demoted."""
        start, end, kinds = self._kinds(start, end, kinds)
        if not kinds & 2:
            return
        for r in sorted(r for r in self._leaves_2m if r < end and r + PMD_PAGES > start):
            if r < start or r + PMD_PAGES > end:
                self._demote(r)
            else:
                self._leaves_2m.discard(r)

    def _split_folio(self, index: int, pfn: int, order: int) -> None:
        for r in sorted(r for r in self._leaves_2m if index <= r < index + (1 << order)):
            self._demote(r)

    def _merge_folio(self, index: int, pfn: int, order: int) -> None:
        for r in range(index, index + (1 << order) - PMD_PAGES + 1, PMD_PAGES):
            self._leaves_2m.add(r)
            self.promotes += 1

    def _check_state(self, f: GuestMemfd, out: list[Violation]) -> None:
        for r in sorted(self._leaves_2m):
            folio = f._cache.lookup_folio(r)
            if not f._attrs.range_has(r, r + PMD_PAGES, PRIVATE):
                out.append(
                    Violation(
                        self.name,
                        "sept-2m-covers-shared-page",
                        r,
                        None,
                        "a 2 MiB Secure EPT leaf maps a shared page",
                    )
                )
            elif folio is None or folio.nr_pages < PMD_PAGES:
                out.append(
                    Violation(
                        self.name,
                        "sept-2m-within-one-folio",
                        r,
                        None,
                        "a 2 MiB Secure EPT leaf maps pages of smaller folios",
                    )
                )


class PKVM(Arch):
    """pKVM: page ownership moves with share/unshare; teardown scrubs before the host gets it."""

    NAME = "pkvm"
    config = frozenset({"FREE"})
    CONTENTS_RULE = "conversion-keeps-guest-data"
    OWNER_HOST, OWNER_GUEST, OWNER_SHARED = 0, 1, 2

    def __init__(self) -> None:
        super().__init__()
        self.pages_scrubbed = self.pages_donated = self.pages_shared = 0

    @property
    def stats(self) -> dict[str, int]:
        return {
            "pages_donated": self.pages_donated,
            "pages_scrubbed": self.pages_scrubbed,
            "pages_shared": self.pages_shared,
        }

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        start_pfn, end_pfn = self._pfns(start_pfn, end_pfn)
        pm = self._file.physmem
        self.contents_touched = True
        pm.fill(start_pfn, end_pfn - start_pfn, 0)
        pm.owner.store(start_pfn - pm.base_pfn, end_pfn - pm.base_pfn, self.OWNER_HOST)
        self.pages_scrubbed += end_pfn - start_pfn

    def _set_owner(self, start_pfn: int, end_pfn: int, owner: int) -> None:
        pm = self._file.physmem
        a, b = start_pfn - pm.base_pfn, end_pfn - pm.base_pfn
        for s, e, v in pm.owner.runs(a, b).tolist():
            if v != owner:
                if owner == self.OWNER_GUEST:
                    self.pages_donated += e - s
                else:
                    self.pages_shared += e - s
        pm.owner.store(a, b, owner)

    def _guest_mapped(self, index: int, pfn: int, nr: int, private: bool) -> None:
        self._set_owner(pfn, pfn + nr, self.OWNER_GUEST if private else self.OWNER_SHARED)

    def _attributes_set(self, start: int, end: int, attrs: int) -> None:
        owner = self.OWNER_GUEST if attrs & PRIVATE else self.OWNER_SHARED
        for s, e in self._file.pfn_ranges(start, end).tolist():
            self._set_owner(s, e, owner)

    def _check_freed(self, pfn: int, nr: int, out: list[Violation]) -> None:
        pm = self._file.physmem
        for a, b, v in pm.contents(pfn, nr):
            if v != 0:
                out.append(
                    Violation(
                        self.name,
                        "free-pool-page-scrubbed",
                        None,
                        a,
                        f"{b - a} pages go back to the free pool holding {v:#x}",
                    )
                )
        for a, b, v in pm.owner.runs(pfn - pm.base_pfn, pfn + nr - pm.base_pfn).tolist():
            if v != self.OWNER_HOST:
                out.append(
                    Violation(
                        self.name,
                        "free-pool-page-host-owned",
                        None,
                        a + pm.base_pfn,
                        f"{b - a} pages go back to the free pool not owned by the host",
                    )
                )

    def _check_host_reach(self, index: int, pfn: int, out: list[Violation]) -> None:
        pm = self._file.physmem
        if pm.owner.load(pfn - pm.base_pfn) == self.OWNER_GUEST:
            out.append(
                Violation(
                    self.name,
                    "host-never-reaches-guest-pages",
                    index,
                    pfn,
                    "the host maps a page the guest owns",
                )
            )


class Recorder(Arch):
    """Logs every hook call, one entry per range for make_shared and free_folio."""

    NAME = "recorder"

    def __init__(self, config: Any = frozenset()) -> None:
        super().__init__()
        self.config = config_names(config)
        self.calls: list[tuple[Any, ...]] = []

    @property
    def stats(self) -> dict[str, int]:
        return {"calls": len(self.calls)}

    def _name(self, mainline: str, thread: str) -> str:
        """Logged under the names of the file's design."""
        return mainline if self._file.hook_design == "mainline" else thread

    def prepare(self, index: int, pfn: int, nr_pages: int) -> None:
        args = self._prepare_args(index, pfn, nr_pages)
        self.calls.append((self._name("make_private", "prepare"), *args))

    def make_shared(self, start_pfn: int, end_pfn: int) -> None:
        self.calls.append(("make_shared", *self._pfns(start_pfn, end_pfn)))

    def free_folio(self, start_pfn: int, end_pfn: int) -> None:
        args = self._pfns(start_pfn, end_pfn)
        self.calls.append((self._name("reclaim", "free_folio"), *args))

    def invalidate_start(self, start: int, end: int, kinds: int) -> None:
        self.calls.append(("invalidate_start", *self._kinds(start, end, kinds)))

    def invalidate_end(self, start: int, end: int) -> None:
        self.calls.append(("invalidate_end", *self._range(start, end)))

    def invalidate_range(self, start: int, end: int, kinds: int) -> None:
        self.calls.append(("invalidate_range", *self._kinds(start, end, kinds)))

    def post_populate(self, index: int, pfn: int, token: int | None = None) -> None:
        self.calls.append(("post_populate", *self._populate_args(index, pfn, token)))

    def ranges(self, hook: str) -> npt.NDArray[np.uint64]:
        rows = [c[1:3] for c in self.calls if c[0] == hook]
        return np.array(rows, dtype=np.uint64).reshape(-1, 2)

    def clear(self) -> None:
        self.calls.clear()


__all__ = ["PKVM", "SNP", "TDX", "Arch", "Recorder", "SwProtected", "Violation"]
