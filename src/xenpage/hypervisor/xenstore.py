"""A small xenstore (the daemon dom0 runs, ``tools/xenstored``): a tree of paths with owner
and per-domain permissions, and watches recorded as pending events.

Permissions follow xenstored: a node's first permission names its owner and the default
access for everyone else (``n`` none, ``r`` read, ``w`` write, ``b`` both); further entries
grant access to named domains; the owner and dom0 may always read and write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..abi import errno as E


class XenstoreError(Exception):
    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


@dataclass
class Node:
    value: str
    owner: int
    default: str = "n"
    acl: dict[int, str] = field(default_factory=dict)

    def allows(self, domid: int, mode: str) -> bool:
        if domid == 0 or domid == self.owner:
            return True
        p = self.acl.get(domid, self.default)
        return p == "b" or p == mode


class Xenstore:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"/": Node("", 0)}
        #: (watching domid, path, token) registrations and fired events
        self.watches: list[tuple[int, str, str]] = []
        self.events: list[tuple[int, str, str]] = []

    @staticmethod
    def _norm(path: str) -> str:
        if not path.startswith("/"):
            raise XenstoreError(E.EINVAL, f"relative path {path!r}")
        return "/" + "/".join(p for p in path.split("/") if p)

    def read(self, caller: int, path: str) -> str:
        p = self._norm(path)
        n = self.nodes.get(p)
        if n is None:
            raise XenstoreError(E.ENOENT, p)
        if not n.allows(caller, "r"):
            raise XenstoreError(E.EACCES, p)
        return n.value

    def exists(self, path: str) -> bool:
        return self._norm(path) in self.nodes

    def write(self, caller: int, path: str, value: str) -> None:
        p = self._norm(path)
        n = self.nodes.get(p)
        if n is not None:
            if not n.allows(caller, "w"):
                raise XenstoreError(E.EACCES, p)
            n.value = value
        else:
            parent = p.rsplit("/", 1)[0] or "/"
            pn = self.nodes.get(parent)
            if pn is not None and not pn.allows(caller, "w"):
                raise XenstoreError(E.EACCES, p)
            if pn is None:
                self.write(caller, parent, "")
                pn = self.nodes[parent]
            self.nodes[p] = Node(value, pn.owner if caller == 0 else caller, pn.default, dict(pn.acl))
        for (w, wp, tok) in self.watches:
            if p == wp or p.startswith(wp.rstrip("/") + "/"):
                self.events.append((w, p, tok))

    def set_perms(self, path: str, owner: int, default: str = "n",
                  acl: dict[int, str] | None = None) -> None:
        n = self.nodes[self._norm(path)]
        n.owner, n.default, n.acl = owner, default, dict(acl or {})

    def rm(self, caller: int, path: str) -> None:
        p = self._norm(path)
        if p not in self.nodes:
            raise XenstoreError(E.ENOENT, p)
        if not self.nodes[p].allows(caller, "w"):
            raise XenstoreError(E.EACCES, p)
        for k in [k for k in self.nodes if k == p or k.startswith(p + "/")]:
            del self.nodes[k]

    def ls(self, path: str) -> list[str]:
        p = self._norm(path).rstrip("/")
        pre = p + "/"
        return sorted({k[len(pre):].split("/")[0] for k in self.nodes if k.startswith(pre)})

    def watch(self, domid: int, path: str, token: str) -> None:
        self.watches.append((domid, self._norm(path), token))

    def to_state(self) -> dict:
        return {"nodes": {k: [n.value, n.owner, n.default, {str(a): b for a, b in n.acl.items()}]
                          for k, n in self.nodes.items()},
                "watches": [list(w) for w in self.watches]}

    @classmethod
    def from_state(cls, st: dict) -> "Xenstore":
        xs = cls()
        xs.nodes = {k: Node(v, o, d, {int(a): b for a, b in acl.items()})
                    for k, (v, o, d, acl) in st["nodes"].items()}
        xs.watches = [tuple(w) for w in st["watches"]]
        return xs
