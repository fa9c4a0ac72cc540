"""Shards moving between nodes: a node that joins takes its share, a node
drained hands all of its shards away before it exits, and nothing ACKed is lost.

One move of shard S from node A to node B:

1. A's worker 0 (the lease holder, which plans moves for its node) marks S
   moving to B in the map (CAS). From that epoch every node refuses frames for
   S (UNAVAILABLE: senders retry with backoff) and new sessions of its users are
   told to retry.
2. A's worker owning S closes the sessions of S's users (GOAWAY, reconnect in a
   moment), waits for what they forwarded, then quiesces S in its log: every
   later write is refused, and once the group commit has released the ACKs of
   everything before, the files are final. The old owner has stopped ACKing.
3. It streams the shard's directory — messages, device registry, dedup
   (producer) state, presence and group state are all records in it — to B's
   worker for S, which writes it beside its log, checks sizes and digests,
   fsyncs and renames it into place (gateway/cluster/shardcopy.py).
4. A's worker 0 switches the owner to B (CAS; the new epoch is S's `since`). B
   adopts S when its map shows it (recovery, as at start) and serves it; A
   releases and deletes its copy when its map shows it.

A failure anywhere before step 4 (B down, a copy refused, a timeout) clears the
mark and A resumes S; B's partial copy is removed, and a complete one that was
never switched to is replaced by the next install. A node killed mid-move finds
its mark on restart and clears it. The owner's copy is deleted only once the map
— the single source of truth, changed by CAS — names the new owner, whose copy
was durable before the switch.

With replicas (`replicas` > 1) a move copies no files: it promotes a replica.
Before step 1 the target is added to the shard's replicas as catching up (a
copy beyond `replicas` until the switch), streams in like any replica
(gateway/cluster/replication.py) and is promoted in sync by the owner. Only
then is S marked moving; step 2's quiesce releases its ACKs only once every
in-sync replica holds everything, so the target's copy is the final log; step
3 is a check that the stream to it is idle and acknowledged; at step 4 the
target's copy becomes its log (as at a takeover) and the old owner drops its
own. A move of a 10 GB shard costs what a move of an empty one does.

Plans are rendezvous hashing over the live nodes that are not draining: a node
joining wins about 1/N of the shards, and only those move.
"""
import asyncio
import json
import random
import time

from _core.log import shard_dir_name
from _core.protocol import GoawayCode

from .. import log
from .shardcopy import ShardImport, export_shard
from .shardmap import hrw_owner, hrw_rank

_log = log.get("switchboard.cluster")

#: shards marked moving per map CAS, and copies streamed at once
BATCH = 16
PARALLEL = 4
CHUNK = 512 << 10
STEP_TIMEOUT = 30.0


def ctl_subject(cluster: str, node: str, worker: int) -> str:
    return f"{cluster}.ctl.{node}.{worker}"


class ShardMover:
    """Per worker: the control subject that exports and installs shards, and
    the reaction to map changes (adopt what became ours, drop what left). Worker 0
    also plans and runs its node's moves."""

    def __init__(self, gateway, node):
        self.gw, self.node = gateway, node
        self.cluster = node.cfg.cluster_name
        self.imports: dict[int, ShardImport] = {}
        self.running: set[int] = set()          # shards this node is moving now (worker 0)
        self.moves_done = self.moves_failed = self.shards_in = self.shards_out = 0
        self.bytes_out = 0
        self._wake = asyncio.Event()
        self._tasks = []
        self._sub = None
        self._exports: set[asyncio.Task] = set()
        self.draining = False
        #: moves promote an in-sync replica instead of copying the shard's files
        self._promoting = node.cfg.replicas > 1

    async def start(self) -> None:
        nc = self.node.nc
        self._sub = await nc.subscribe(ctl_subject(self.cluster, self.node.name, self.node.me), cb=self._on_ctl)
        self.node.on_map_change = self.map_changed
        self.node.members_changed = self._wake.set
        self._quiesce_marked(self.node.view)
        if self.node.me == 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._plan_loop()))

    # -- every worker: following the map ----------------------------------------------
    def _mine(self, s: int) -> bool:
        return s % self.node.workers == self.node.me

    def _quiesce_marked(self, view) -> None:
        """At start: shards of ours marked moving (we died mid-move) take no writes until cleared."""
        store = self.gw.router.store
        for s, _to in view.moving.items():
            if view.owner[s] == self.node.name and self._mine(s) and store.moving.get(s) is None:
                store.quiesce(s)

    def map_changed(self, old, new) -> None:
        """Runs in the map watch, before any frame routed at the new epoch: adopt
        shards that became ours, release and delete those that left, resume a
        shard whose move was called off."""
        me = self.node.name
        store = self.gw.router.store
        router = self.gw.router
        repl = self.node.replication
        if repl is not None:
            repl.map_changed(old, new)
        changed = {s for s in range(new.shards) if old.owner[s] != new.owner[s]}
        if changed:
            shard_of = self.node.shards.shard
            router.fail_forwards(lambda user: shard_of(user) in changed)
        for s in range(new.shards):
            if s in changed:
                router.shard_owner_changed(s)     # our watchers of its users subscribe again at the new owner
            if not self._mine(s):
                continue
            was, now = old.owner[s] == me, new.owner[s] == me
            if now and not was:
                moved = old.moving.get(s) == me
                from_copy = repl is not None and repl.holds_copy(s) and (not moved or self._promoting)
                try:
                    if from_copy:
                        repl.install_as_log(s)      # our replica copy becomes the shard's log
                    report = store.adopt(s)
                except Exception:
                    _log.exception("event=shard_adopt_failed shard=%d", s)
                    raise
                router.shard_arrived(s)
                self.shards_in += 1
                _log.info("event=shard_adopted shard=%d epoch=%d pending=%d from=%s", s, new.epoch, report.pending,
                          ("promotion" if moved else "replica") if from_copy else "move")
            elif was and not now:
                handed = store.moving.get(s) is not None     # our move, not a takeover from us
                if not handed:                       # taken over by a replica (we were paused or cut off)
                    _log.warning("event=shard_lost_unquiesced shard=%d epoch=%d new_owner=%s", s, new.epoch,
                                 new.owner[s])
                    router.shard_leaving(s, GoawayCode.SHUTTING_DOWN, "this user's shard is served by another node",
                                         random.randint(100, 1000))
                    store.quiesce(s)
                kept = False
                if (handed and self._promoting and repl is not None and store.moving.get(s) == "quiesced"
                        and self.node.name in new.catching.get(s, ())):
                    lg = store.logs.get(s)
                    segments = [(seg.segment_id, seg.end) for seg in lg.segments] if lg is not None else []
                    store.release(s)
                    try:
                        repl.keep_log_as_copy(s, segments, new.since[s], new.owner[s])
                        kept = True
                    except Exception as exc:      # dropped instead: the new owner sends a snapshot
                        _log.warning("event=replica_keep_log_failed shard=%d error=%s", s, log.q(repr(exc)))
                else:
                    store.release(s)
                store.drop(s)                        # (a kept log is no longer there: only forgotten)
                self.shards_out += 1
                _log.info("event=shard_handed_over shard=%d to=%s epoch=%d kept_as_copy=%s", s, new.owner[s],
                          new.epoch, kept)
            elif now and s in old.moving and s not in new.moving and store.moving.get(s) == "quiesced":
                store.resume(s)
                _log.info("event=shard_move_abandoned shard=%d epoch=%d", s, new.epoch)
        if repl is not None:
            repl.reconcile(new)
        self._wake.set()

    # -- the control subject ----------------------------------------------------------
    async def _on_ctl(self, msg) -> None:
        """Imports are handled in order, here (NATS runs a subscription's callbacks one
        at a time); an export runs as its own task, so this worker takes a copy in
        while it sends one out (two nodes moving shards to each other must not wait
        on each other's subscription)."""
        if msg.data.startswith(b'{"cmd": "out"'):
            task = asyncio.get_running_loop().create_task(self._serve(msg))
            self._exports.add(task)               # held: a task nobody references may be collected
            task.add_done_callback(self._exports.discard)
        else:
            await self._serve(msg)

    async def _serve(self, msg) -> None:
        head, _, body = bytes(msg.data).partition(b"\n")
        try:
            req = json.loads(head)
            answer = await self._handle(req, body)
        except Exception as exc:
            _log.warning("event=shard_ctl_failed request=%s error=%s", log.q(head[:200].decode(errors="replace")),
                         log.q(repr(exc)))
            answer = {"ok": False, "error": repr(exc)}
        if msg.reply:
            await self.node.nc.publish(msg.reply, json.dumps(answer).encode())

    async def _handle(self, req: dict, body: bytes) -> dict:
        cmd, s = req["cmd"], int(req["shard"])
        if cmd == "out":
            await self._move_out(s, req["to"], int(req["epoch"]))
            return {"ok": True}
        if cmd == "in-begin":
            view = self.node.view
            if view.epoch < int(req["epoch"]):
                view = await self.node.map.refresh()
            if view.moving.get(s) != self.node.name:
                return {"ok": False, "error": f"shard {s} is not moving to {self.node.name} at epoch {view.epoch}"}
            old = self.imports.pop(s, None)
            if old is not None:
                old.abort()
            self.imports[s] = ShardImport(self.gw.router.store.root, s)
            return {"ok": True}
        imp = self.imports.get(s)
        if imp is None:
            return {"ok": False, "error": f"no copy of shard {s} in progress"}
        if cmd == "in-chunk":
            imp.feed(body)
            return {"ok": True}
        if cmd == "in-finish":
            del self.imports[s]
            await asyncio.get_running_loop().run_in_executor(None, imp.finish)    # fsyncs: off the loop
            return {"ok": True}
        if cmd == "in-abort":
            del self.imports[s]
            imp.abort()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _request(self, subject: str, head: dict, body: bytes = b"", timeout: float = STEP_TIMEOUT) -> None:
        r = await self.node.nc.request(subject, json.dumps(head).encode() + b"\n" + body, timeout=timeout)
        answer = json.loads(r.data)
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error", "refused"))

    async def _move_out(self, s: int, to: str, epoch: int) -> None:
        """Steps 2-3 at the owning worker: stop S, then stream it to `to`."""
        view = self.node.view
        if view.epoch < epoch:
            view = await self.node.map.refresh()
        if view.owner[s] != self.node.name or view.moving.get(s) != to:
            raise RuntimeError(f"shard {s} is not ours moving to {to} at epoch {view.epoch}")
        router, store = self.gw.router, self.gw.router.store
        if store.moving.get(s) is None:
            answered = router.shard_leaving(s, GoawayCode.SHUTTING_DOWN, "this user's shard is moving to another node",
                                            random.randint(100, 1000))
            await asyncio.wait_for(answered, STEP_TIMEOUT)
            await asyncio.wait_for(store.quiesce(s), STEP_TIMEOUT)
        if self._promoting:
            await self.node.replication.handed_over(s, to, STEP_TIMEOUT)
            return
        info = self.node.members.nodes.get(to) or {}
        dest = ctl_subject(self.cluster, to, s % info.get("workers", 1))
        await self._request(dest, {"cmd": "in-begin", "shard": s, "from": self.node.name, "epoch": epoch})
        try:
            for chunk in export_shard(store.root / shard_dir_name(s), CHUNK):
                await self._request(dest, {"cmd": "in-chunk", "shard": s}, chunk)
                self.bytes_out += len(chunk)
            await self._request(dest, {"cmd": "in-finish", "shard": s})
        except BaseException:
            try:
                await self._request(dest, {"cmd": "in-abort", "shard": s}, timeout=2)
            except Exception:
                pass
            raise

    # -- worker 0: planning ---------------------------------------------------------------
    async def _plan_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self.node.serving():
                continue
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("event=shard_plan_failed error=%s", log.q(repr(exc)))
                await asyncio.sleep(0.5)

    def plan(self, view) -> dict[int, str]:
        """Shards of ours that rendezvous hashing over the live, non-draining nodes gives to another."""
        me = self.node.name
        live = [n for n, i in self.node.members.live_nodes().items() if not i.get("draining")]
        if me in live and self.draining:
            live.remove(me)
        if not live:
            return {}
        out = {}
        for s in view.shards_of(me):
            if s in view.moving:
                continue
            target = hrw_owner(s, live)
            if target != me:
                out[s] = target
        return out

    async def _place_replicas(self, plan: dict[int, str]) -> bool:
        """Each shard of ours on its `replicas` - 1 placement nodes (`placement`).
        A dead replica leaves the sets (its copy is stale once it returns: it comes
        back as a new replica and catches up). True if the map changed."""
        me = self.node.name
        members = self.node.members
        live = [n for n, i in members.live_nodes().items() if not i.get("draining") and n != me]
        want = self.node.cfg.replicas - 1

        def mutate(d):
            changed = False
            for s in d.shards_of(me):
                if s in d.moving:
                    continue
                isr = d.replicas.get(s, [])
                cat = d.catching.get(s, [])
                isr2, cat2 = placement([n for n in isr if n != me and members.alive(n)],
                                       [n for n in cat if n != me and members.alive(n)],
                                       [n for n in hrw_rank(s, live) if n not in d.full], want, plan.get(s))
                if isr2 != isr or cat2 != cat:
                    d.replicas[s], d.catching[s] = isr2, cat2
                    changed = True
            return {} if changed else None
        new = await self.node.map.change(mutate)
        if new is not None:
            _log.info("event=replicas_placed epoch=%d catching=%d", new.epoch,
                      sum(len(v) for s, v in new.catching.items() if new.owner[s] == me))
        return new is not None

    async def _step(self) -> None:
        me = self.node.name
        view = self.node.view
        stale = [s for s, _ in view.moving.items() if view.owner[s] == me and s not in self.running]
        if stale:                                # marks left by an earlier life of this node: call them off
            _log.info("event=shard_moves_cleared shards=%d", len(stale))
            await self.node.map.change(lambda d: _unmark(d, stale))
            return
        plan = self.plan(view)
        if self._promoting:
            if await self._place_replicas(plan):
                return
            plan = {s: to for s, to in plan.items() if to in view.replicas.get(s, ())}   # in sync: ready
        todo = dict(list(plan.items())[:BATCH])
        if not todo:
            return

        def mark(d):
            picked = {s: t for s, t in todo.items() if d.owner[s] == me and s not in d.moving}
            d.moving.update(picked)
            todo.clear()
            todo.update(picked)
            return {} if picked else None
        marked = await self.node.map.change(mark)
        if marked is None or not todo:
            return
        self.running.update(todo)
        t0 = time.monotonic()
        gate = asyncio.Semaphore(PARALLEL)

        async def one(s, to):
            async with gate:
                w = s % self.node.workers
                try:
                    await self._request(ctl_subject(self.cluster, me, w),
                                        {"cmd": "out", "shard": s, "to": to, "epoch": marked.epoch},
                                        timeout=STEP_TIMEOUT * 3)
                    return s, True
                except Exception as exc:
                    _log.warning("event=shard_move_failed shard=%d to=%s error=%s", s, to, log.q(repr(exc)))
                    return s, False
        results: dict[int, bool] = {}
        try:
            results.update(await asyncio.gather(*(one(s, t) for s, t in todo.items())))
        finally:
            ok = {s for s, good in results.items() if good}

            def switch(d):
                owners = {}
                for s, to in todo.items():
                    if d.moving.get(s) == to:
                        del d.moving[s]
                        if s in ok and d.owner[s] == me:
                            owners[s] = to
                            for sets in (d.replicas, d.catching):     # an owner is no replica of its shard
                                if to in sets.get(s, ()):
                                    sets[s] = [n for n in sets[s] if n != to]
                            if self._promoting and not self.draining:
                                # our log, final at the switch, is kept as a copy: if the new owner's
                                # placement wants us, its stream resumes from it (else we are dropped)
                                d.catching[s] = [*d.catching.get(s, ()), me]
                return owners
            await self.node.map.change(switch)
            self.running.difference_update(todo)
        self.moves_done += len(ok)
        self.moves_failed += len(todo) - len(ok)
        _log.info("event=shards_moved count=%d failed=%d to=%s seconds=%.3f", len(ok), len(todo) - len(ok),
                  ",".join(sorted(set(todo.values()))), time.monotonic() - t0)
        self._wake.set()                        # more to do, perhaps

    # -- draining -----------------------------------------------------------------------
    async def hand_over_all(self, timeout: float) -> bool:
        """Drain: hand this node's shards to the others; True once the node owns none
        (every worker waits for that; worker 0 plans the moves)."""
        self.draining = True
        if self.node.me == 0:
            await self.node.members.update_info(draining=True)
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.node.view.shards_of(self.node.name):
            others = [n for n, i in self.node.members.live_nodes().items()
                      if n != self.node.name and not i.get("draining")]
            if not others or time.monotonic() > deadline:
                return False                 # nobody to take them: they stay ours, unavailable while we are gone
            await asyncio.sleep(0.1)
        return True

    def stats(self) -> dict:
        return {"moves_done": self.moves_done, "moves_failed": self.moves_failed, "shards_in": self.shards_in,
                "shards_out": self.shards_out, "bytes_out": self.bytes_out, "running": sorted(self.running),
                "importing": sorted(self.imports)}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for imp in self.imports.values():
            imp.abort()
        self.imports.clear()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass


def _unmark(d, shards) -> dict:
    for s in shards:
        d.moving.pop(s, None)
    return {}


def placement(isr: list, catching: list, ranked: list, want: int, target: str | None = None):
    """A shard's next (in-sync, catching) replica lists: its `want` replicas are the
    first nodes of `ranked` (its rendezvous order over the live nodes that may
    hold copies), as joins and drains move owners, so that every node holds its
    share of copies. A node missing from them is added as catching up (the owner
    promotes it once it holds everything); an in-sync replica outside them is
    dropped only once every one of them is in sync (add a replica, catch up, drop
    the old copy: never fewer in-sync copies than before); a catching node outside
    them is dropped at once. A shard that moves to `target` keeps its in-sync
    replicas and gets the target as one copy more until the switch (the move
    promotes it); its new owner places its replicas after the switch.

    `isr` and `catching` hold live nodes other than the owner."""
    if target is not None:
        ideal = [target, *[n for n in isr if n != target]]
        ideal += [n for n in ranked if n not in ideal][:max(0, want + 1 - len(ideal))]
        return list(isr), [n for n in ideal if n not in isr]
    ideal = ranked[:want]
    isr2 = list(isr)
    cat2 = [n for n in catching if n in ideal and n not in isr2]
    cat2 += [n for n in ideal if n not in isr2 and n not in cat2]
    if len(ideal) >= want and all(n in isr2 for n in ideal):
        isr2 = [n for n in isr2 if n in ideal]
    # in rendezvous order: the first live one takes over, where the planner wants the shard then
    order = {n: i for i, n in enumerate(ranked)}
    isr2.sort(key=lambda n: order.get(n, len(order)))
    return isr2, cat2
