"""Groups: membership with roles, and the fan-out of group messages.

A group (id "#name") lives on the shard of its id, like a user: that worker
keeps its state (a META record in its log: name and members with roles) and
handles every operation and message for it. A message to a group is checked
(the sender must be a member), stored once in the group's own inbox — so it is
in the log before the sender's ACK — then copied to every member (each
member's worker stores it for every device but the sending one). The group's
copy is consumed once every member has its own; after a restart, unconsumed
group messages are fanned out again, and members drop copies they already have
(deduplicated by the group message's id).
"""
import asyncio
import base64
import json

from _core import frames
from _core.errors import StoreError
from _core.protocol import GROUP_PREFIX, MAX_ID_LENGTH, ErrorCode, GroupOp

KEY = "g\x00{}"
RETRY_S = 1.0


class GroupService:
    def __init__(self, router, *, max_members: int = 1024):
        self.router = router
        self.max_members = max_members
        self._cache: dict[str, dict | None] = {}
        self.jobs: dict[int, dict] = {}          # origin id -> fan-out still under way
        self._timer = None
        # set by a multi-worker gateway (as for presence)
        self.is_local = lambda name: True
        self.owner_of = lambda name: 0
        self.bus_send = None

    # -- state --------------------------------------------------------------------------
    def get(self, group: str) -> dict | None:
        if group not in self._cache:
            raw = self.router.store.meta_get_for(group, KEY.format(group))
            self._cache[group] = json.loads(raw) if raw else None
        return self._cache[group]

    def _put(self, group: str, state: dict | None) -> None:
        self.router.store.meta_put_for(group, KEY.format(group), json.dumps(state).encode() if state else b"")
        self._cache[group] = state

    @staticmethod
    def info(group: str, state: dict) -> dict:
        return {"group": group, "name": state["name"], "members": state["members"]}

    # -- operations ---------------------------------------------------------------------
    def handle(self, session, frame: frames.Group) -> None:
        self._route({"t": "gop", "req": frame.request_id, "op": frame.op, "group": frame.group, "arg": frame.arg,
                     "actor": session.user, "device": session.device}, frame.group)

    def apply(self, op: int, actor: str, group: str, arg: dict) -> dict:
        """One operation at the group's owner; raises StoreError(code, reason) to refuse."""
        if not group.startswith(GROUP_PREFIX) or len(group.encode()) > MAX_ID_LENGTH:
            raise StoreError(f"group ids start with {GROUP_PREFIX!r} and are at most 255 bytes", ErrorCode.BAD_REQUEST)
        users = arg.get("members", [])
        if not isinstance(users, list) or not all(isinstance(u, str) and u and not u.startswith(GROUP_PREFIX)
                                                  for u in users):
            raise StoreError("members must be a list of user ids", ErrorCode.BAD_REQUEST)
        state = self.get(group)
        if op == GroupOp.CREATE:
            if state is not None:
                raise StoreError(f"{group} exists", ErrorCode.GROUP_EXISTS)
            members = {u: "member" for u in users}
            members[actor] = "admin"
            self._limit(members)
            state = {"name": str(arg.get("name") or group), "members": members}
            self._put(group, state)
            return self.info(group, state)
        if state is None:
            raise StoreError(f"no group {group}", ErrorCode.NO_SUCH_GROUP)
        members = dict(state["members"])
        if actor not in members:
            raise StoreError(f"{actor} is not a member of {group}", ErrorCode.NOT_A_MEMBER)
        if op == GroupOp.INFO:
            return self.info(group, state)
        if op == GroupOp.LEAVE:
            del members[actor]
            if members and "admin" not in members.values():
                members[min(members)] = "admin"          # a group always has an admin
            self._put(group, {**state, "members": members} if members else None)
            return {"group": group, "left": True}
        if members[actor] != "admin":
            raise StoreError(f"only admins of {group} can do that", ErrorCode.NOT_ADMIN)
        if op == GroupOp.ADD:
            for u in users:
                members.setdefault(u, "member")
            self._limit(members)
        elif op == GroupOp.REMOVE:
            for u in users:
                members.pop(u, None)
            if members and "admin" not in members.values():
                members[min(members)] = "admin"          # a group always has an admin
        elif op in (GroupOp.PROMOTE, GroupOp.DEMOTE):
            missing = [u for u in users if u not in members]
            if missing:
                raise StoreError(f"not members: {', '.join(missing)}", ErrorCode.BAD_REQUEST)
            for u in users:
                members[u] = "admin" if op == GroupOp.PROMOTE else "member"
            if "admin" not in members.values():
                raise StoreError("a group needs an admin", ErrorCode.BAD_REQUEST)
        elif op == GroupOp.RENAME:
            name = arg.get("name")
            if not isinstance(name, str) or not name or len(name.encode()) > 255:
                raise StoreError("a name is 1..255 bytes", ErrorCode.BAD_REQUEST)
            state = {**state, "name": name}
        else:
            raise StoreError(f"unknown group operation {op}", ErrorCode.BAD_REQUEST)
        state = {**state, "members": members}
        self._put(group, state if members else None)
        return self.info(group, state)

    def _limit(self, members: dict) -> None:
        if len(members) > self.max_members:
            raise StoreError(f"a group has at most {self.max_members} members", ErrorCode.GROUP_FULL)

    # -- messages -----------------------------------------------------------------------
    def send(self, sender: str, device: str, client_id: int, group: str, payload: bytes) -> tuple:
        """A SEND to `group` (owned here): store it once, ACK, fan out."""
        state = self.get(group)
        if state is None:
            raise StoreError(f"no group {group}", ErrorCode.NO_SUCH_GROUP)
        if sender not in state["members"]:
            raise StoreError(f"{sender} is not a member of {group}", ErrorCode.NOT_A_MEMBER)
        msg_id, ts = self.router.new_id()
        self.router.store.append(group, msg_id, ts, sender, device, payload, client_id)
        job = {"origin": msg_id, "ts": ts, "sender": sender, "device": device, "group": group,
               "payload": payload, "pending": set(state["members"])}
        self.jobs[msg_id] = job
        self._run(job)
        return msg_id, ts

    def _run(self, job: dict) -> None:
        for member in list(job["pending"]):
            if self.is_local(member) or self.bus_send is None:
                try:
                    self.router.store_group_copy(member, job["origin"], job["ts"], job["sender"], job["device"],
                                                 job["group"], job["payload"])
                except StoreError:
                    continue              # the member's shard is full: still pending, retried
                job["pending"].discard(member)
            else:
                self.bus_send(self.owner_of(member), {
                    "t": "gcopy", "member": member, "origin": job["origin"], "ts": job["ts"],
                    "sender": job["sender"], "device": job["device"], "group": job["group"],
                    "payload": base64.b64encode(job["payload"]).decode()})
        self._finish_if_done(job)
        if job["pending"] and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RETRY_S, self._retry)

    def _finish_if_done(self, job: dict) -> None:
        if not job["pending"] and self.jobs.pop(job["origin"], None) is not None:
            self.router.store.consume(job["group"], [job["origin"]])

    def _retry(self) -> None:
        """Members whose worker did not confirm their copy get it again (they drop duplicates)."""
        self._timer = None
        for job in list(self.jobs.values()):
            self._run(job)

    def recover(self) -> None:
        """After a restart: fan out again what was stored but not confirmed."""
        store = self.router.store
        for key in store.meta_keys_local("g\x00") if hasattr(store, "meta_keys_local") else ():
            group = key.split("\x00", 1)[1]
            state = self.get(group)
            for m in store.pending(group):
                if state is None:
                    store.consume(group, [m.msg_id])
                    continue
                job = {"origin": m.msg_id, "ts": m.timestamp_ms, "sender": m.sender, "device": m.sender_device,
                       "group": group, "payload": m.payload, "pending": set(state["members"])}
                self.jobs[m.msg_id] = job
                self._run(job)

    # -- the bus --------------------------------------------------------------------------
    def _route(self, msg: dict, name: str) -> None:
        if self.is_local(name) or self.bus_send is None:
            self.control(msg)
        else:
            self.bus_send(self.owner_of(name), msg)

    def control(self, msg: dict) -> None:
        t = msg["t"]
        if t == "gop":
            try:
                arg = json.loads(msg["arg"] or "{}")
                if not isinstance(arg, dict):
                    raise ValueError
            except ValueError:
                reply = {"code": ErrorCode.BAD_REQUEST, "reason": "the argument must be a JSON object"}
            else:
                try:
                    reply = {"info": json.dumps(self.apply(msg["op"], msg["actor"], msg["group"], arg))}
                except StoreError as exc:
                    reply = {"code": int(exc.code), "reason": str(exc)}
            self._route({"t": "greply", "to": msg["actor"], "device": msg["device"], "req": msg["req"], **reply},
                        msg["actor"])
        elif t == "greply":
            for s in self.router.reply_sessions(msg["to"]):
                if s.device == msg["device"]:
                    if "info" in msg:
                        s.write_frame(frames.GroupInfo(msg["req"], msg["info"]))
                    else:
                        s.error(msg["code"], msg["reason"], msg["req"], False)
        elif t == "gcopy":
            try:
                self.router.store_group_copy(msg["member"], msg["origin"], msg["ts"], msg["sender"], msg["device"],
                                             msg["group"], base64.b64decode(msg["payload"]))
            except StoreError:
                return                    # the member's shard is full: not confirmed, the owner retries
            self._route({"t": "gcopied", "group": msg["group"], "origin": msg["origin"], "member": msg["member"]},
                        msg["group"])
        elif t == "gcopied":
            job = self.jobs.get(msg["origin"])
            if job is not None:
                job["pending"].discard(msg["member"])
                self._finish_if_done(job)
