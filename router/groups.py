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

Sizes: the state is stored in a compact binary form (`encode_state`), so a full
group fits in one log record of the smallest segment; the answer to an operation
(GROUP_INFO, JSON) is cut into frames of at most the session's frame limit
(`info_pages`), so the member limit does not depend on max_frame.
"""
import asyncio
import base64
import json
import struct

from _core import frames
from _core.errors import StoreError
from _core.ids import group_id_problem, is_user_id
from _core.protocol import GROUP_PREFIX, MAX_ID_LENGTH, ErrorCode, GroupOp

KEY = "g\x00{}"
RETRY_S = 1.0
#: The largest member limit a server may be set to (`max_group_members`). A full group's
#: stored state is at most 259 + 257 bytes per member (526,595 bytes at 2048): it always fits
#: in one record of the smallest log segment (1 MiB).
MAX_GROUP_MEMBERS = 2048
#: GROUP_INFO's fixed part: the frame's type and flags, request_id, the info's u16 length
_INFO_OVERHEAD = 2 + 8 + 2
_STATE_FORMAT = 1                 # first byte of a stored state (a JSON one, from before, starts with "{")
_ROLE_BYTE = {"member": 0, "admin": 1}
_ROLE_NAME = ("member", "admin")


def encode_state(state: dict) -> bytes:
    """A group's state as stored: format byte, name (str8), member count (u16), then per
    member its role byte and id (str8): at most 259 + 257 bytes per member."""
    name = state["name"].encode()
    out = [struct.pack("!BB", _STATE_FORMAT, len(name)), name, struct.pack("!H", len(state["members"]))]
    for user, role in state["members"].items():
        u = user.encode()
        out.append(struct.pack("!BB", _ROLE_BYTE[role], len(u)))
        out.append(u)
    return b"".join(out)


def decode_state(raw: bytes) -> dict:
    """The state `encode_state` made (or the JSON of a data dir written before it)."""
    if raw[:1] == b"{":
        return _from_json(json.loads(raw))
    if raw[0] != _STATE_FORMAT:
        raise ValueError(f"unknown group state format {raw[0]}")
    n = raw[1]
    pos = 2 + n
    name = raw[2:pos].decode()
    (count,) = struct.unpack_from("!H", raw, pos)
    pos += 2
    members = {}
    for _ in range(count):
        role, k = raw[pos], raw[pos + 1]
        members[raw[pos + 2:pos + 2 + k].decode()] = _ROLE_NAME[role]
        pos += 2 + k
    return {"name": name, "members": members}


def _from_json(state: dict) -> dict:
    """A state stored as JSON by an older version, which took names and member ids of any
    length: what cannot be an id is dropped (no copy could ever be stored for it), a name is
    cut to 255 bytes, and the group keeps an admin."""
    name = state["name"].encode()[:255].decode("utf-8", "ignore") or "#"
    members = {u: r for u, r in state["members"].items() if _is_user_id(u)}
    if members and "admin" not in members.values():
        members[min(members)] = "admin"
    return {"name": name, "members": members}


def info_pages(text: str, max_frame: int) -> list[str]:
    """`text` cut into pieces that each fit in one GROUP_INFO of at most `max_frame`
    (and in its u16 length), at UTF-8 character boundaries so that each is valid text."""
    limit = min(0xFFFF, max_frame - _INFO_OVERHEAD)
    data = text.encode()
    pages = []
    start = 0
    while True:
        end = min(start + limit, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:     # not inside a character
            end -= 1
        pages.append(data[start:end].decode())
        if end == len(data):
            return pages
        start = end


def _utf8_length(s) -> int:
    """Bytes of `s` in UTF-8; -1 if it is no text (not a str, or a lone surrogate from a JSON escape)."""
    try:
        return len(s.encode()) if isinstance(s, str) else -1
    except UnicodeEncodeError:
        return -1


def _is_user_id(u) -> bool:
    return 1 <= _utf8_length(u) <= MAX_ID_LENGTH and not u.startswith(GROUP_PREFIX)


def _is_name(name) -> bool:
    """A group's display name: any text of 1..255 bytes of UTF-8."""
    try:
        return isinstance(name, str) and 1 <= len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:            # a lone surrogate from a JSON escape
        return False


class GroupService:
    def __init__(self, router, *, max_members: int = 1024):
        if not 1 <= max_members <= MAX_GROUP_MEMBERS:
            raise ValueError(f"the group member limit must be 1..{MAX_GROUP_MEMBERS}, not {max_members}")
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
            self._cache[group] = decode_state(raw) if raw else None
        return self._cache[group]

    def _put(self, group: str, state: dict | None) -> None:
        self.router.store.meta_put_for(group, KEY.format(group), encode_state(state) if state else b"")
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
        problem = group_id_problem(group)
        if problem is not None:
            raise StoreError(f"not a legal group id: {problem}", ErrorCode.BAD_REQUEST)
        users = arg.get("members", [])
        if not isinstance(users, list) or not all(isinstance(u, str) and is_user_id(u) for u in users):
            raise StoreError("members must be a list of legal user ids", ErrorCode.BAD_REQUEST)
        name = arg.get("name")
        if "name" in arg and not _is_name(name):
            raise StoreError("a group name is a string of 1..255 bytes", ErrorCode.BAD_REQUEST)
        state = self.get(group)
        if op == GroupOp.CREATE:
            if state is not None:
                raise StoreError(f"{group} exists", ErrorCode.GROUP_EXISTS)
            name = arg.get("name", group)
            if not 1 <= _utf8_length(name) <= 255:
                raise StoreError("a name is 1..255 bytes", ErrorCode.BAD_REQUEST)
            members = {u: "member" for u in users}
            members[actor] = "admin"
            self._limit(members)
            state = {"name": name, "members": members}
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
            if name is None:
                raise StoreError("RENAME needs a name", ErrorCode.BAD_REQUEST)
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
    def send(self, sender: str, device: str, seq: int, group: str, payload: bytes, producer: int = 0) -> tuple:
        """A SEND to `group` (owned here): store it once, ACK, fan out. The router
        has checked `seq` of `producer` against the group shard's producer table."""
        state = self.get(group)
        if state is None:
            raise StoreError(f"no group {group}", ErrorCode.NO_SUCH_GROUP)
        if sender not in state["members"]:
            raise StoreError(f"{sender} is not a member of {group}", ErrorCode.NOT_A_MEMBER)
        msg_id, ts = self.router.new_id()
        self.router.store.append(group, msg_id, ts, sender, device, payload, seq, producer=producer)
        job = {"origin": msg_id, "ts": ts, "sender": sender, "device": device, "group": group,
               "payload": payload, "pending": state["members"]}     # (the members: a set after the first run)
        self.jobs[msg_id] = job
        self._run(job)
        return msg_id, ts

    def _run(self, job: dict) -> None:
        # this worker's members in one C loop; those left are other workers' members (sent a
        # copy over the bus, confirmed by "gcopied") and members whose shard is full (retried)
        bus = self.bus_send
        left = self.router.copy_to_members(job["pending"], job["origin"], job["ts"], job["sender"], job["device"],
                                           job["group"], job["payload"], None if bus is None else self.is_local)
        job["pending"] = set(left)
        if bus is not None and left:
            # one message per worker that owns some of the rest, its payload encoded once
            by_owner: dict = {}
            for member in left:
                if not self.is_local(member):
                    by_owner.setdefault(self.owner_of(member), []).append(member)
            if by_owner:
                payload = base64.b64encode(job["payload"]).decode()
                for owner, members in by_owner.items():
                    bus(owner, {"t": "gcopies", "members": members, "origin": job["origin"], "ts": job["ts"],
                                "sender": job["sender"], "device": job["device"], "group": job["group"],
                                "payload": payload})
        self._finish_if_done(job)
        if job["pending"] and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RETRY_S, self._retry)

    def _finish_if_done(self, job: dict) -> None:
        if not job["pending"] and self.jobs.pop(job["origin"], None) is not None:
            try:
                self.router.store.consume(job["group"], [job["origin"]])
            except StoreError:
                pass          # the group's shard is moving: its next owner fans it out again (copies dedup)

    def _retry(self) -> None:
        """Members whose worker did not confirm their copy get it again (they drop duplicates)."""
        self._timer = None
        for job in list(self.jobs.values()):
            self._run(job)

    def forget(self, in_shard) -> None:
        """The groups `in_shard(group)` says are moving away: their cached states
        and unfinished fan-outs (the log keeps both; the new owner recovers them)."""
        for group in [g for g in self._cache if in_shard(g)]:
            del self._cache[group]
        for origin in [o for o, job in self.jobs.items() if in_shard(job["group"])]:
            del self.jobs[origin]

    def recover(self, shard: int | None = None) -> None:
        """After a restart (or when `shard` arrived): fan out again what was stored but not confirmed."""
        store = self.router.store
        keys = () if not hasattr(store, "meta_keys_local") else \
            store.meta_keys_local("g\x00") if shard is None else store.meta_keys_local("g\x00", shard)
        for key in keys:
            group = key.split("\x00", 1)[1]
            state = self.get(group)
            for m in store.pending(group):
                if state is None:
                    store.consume(group, [m.msg_id])
                    continue
                job = {"origin": m.msg_id, "ts": m.timestamp_ms, "sender": m.sender, "device": m.sender_device,
                       "group": group, "payload": m.payload, "pending": state["members"]}
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
                    reply = {"info": json.dumps(self.apply(msg["op"], msg["actor"], msg["group"], arg),
                                                ensure_ascii=False)}
                except StoreError as exc:
                    reply = {"code": int(exc.code), "reason": str(exc)}
            self._route({"t": "greply", "to": msg["actor"], "device": msg["device"], "req": msg["req"], **reply},
                        msg["actor"])
        elif t == "greply":
            for s in self.router.reply_sessions(msg["to"]):
                if s.device == msg["device"]:
                    if "info" in msg:            # one frame, or consecutive pieces (flag MORE on all but the last)
                        pages = info_pages(msg["info"], self.router.max_frame)
                        for i, page in enumerate(pages):
                            s.write_frame(frames.GroupInfo(msg["req"], page, i < len(pages) - 1))
                    else:
                        s.error(msg["code"], msg["reason"], msg["req"], False)
        elif t == "gcopies" or t == "gcopy":          # ("gcopy": one member, from an older worker)
            members = msg["members"] if t == "gcopies" else [msg["member"]]
            left = set(self.router.copy_to_members(members, msg["origin"], msg["ts"], msg["sender"], msg["device"],
                                                   msg["group"], base64.b64decode(msg["payload"])))
            done = [m for m in members if m not in left]   # the rest's shard is full: not confirmed, retried
            if done:
                reply = {"t": "gcopied", "group": msg["group"], "origin": msg["origin"], "members": done}
                if t == "gcopy":
                    reply["member"] = done[0]                  # what an older owner reads
                self._route(reply, msg["group"])
        elif t == "gcopied":
            job = self.jobs.get(msg["origin"])
            if job is not None:
                job["pending"].difference_update(msg["members"] if "members" in msg else (msg["member"],))
                self._finish_if_done(job)
