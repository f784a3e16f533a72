"""What the ZeroMQ door owes each client: requests in progress and large replies libzmq still
holds, so a client that sends without reading cannot make the server hoard replies for it.

libzmq queues replies per peer up to ``ZMQ_SNDHWM`` messages, whatever their size: a DEALER that
sends 1 000 ``dataset_file`` requests and never reads would make the server hold 1 000 images. The
ledger counts, per peer, the requests not answered yet and the large replies handed to libzmq but
not yet written to the socket (a ``zmq.MessageTracker`` per reply says when libzmq let it go), and
refuses a new request (503 ``server_busy``) past either cap. It also bounds the bytes of requests
accepted and not yet answered over all peers. Used by the front thread only: no locking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zmq

__all__ = ["PeerLedger"]


@dataclass
class _Peer:
    pending: int = 0                                           # requests accepted, not answered
    unread: list[tuple[zmq.MessageTracker, int]] = field(default_factory=list)   # (tracker, bytes)

    def unread_bytes(self) -> int:
        self.unread = [(tracker, size) for tracker, size in self.unread if not tracker.done]
        return sum(size for _, size in self.unread)


class PeerLedger:
    """Per-peer and process-wide counts behind the ZeroMQ door's back-pressure."""

    def __init__(self, *, max_pending: int, max_unread_bytes: int, max_inflight_bytes: int) -> None:
        self._max_pending = max_pending
        self._max_unread = max_unread_bytes
        self._max_inflight = max_inflight_bytes
        self._peers: dict[bytes, _Peer] = {}
        self.inflight_bytes = 0

    def admit(self, peer: bytes, nbytes: int) -> str | None:
        """Count a new request of ``nbytes`` from ``peer``; or the reason it must be refused."""
        account = self._peers.setdefault(peer, _Peer())
        if account.pending + len(account.unread) >= self._max_pending:
            return f"{self._max_pending} requests of this client are in progress or their replies unread"
        if account.unread_bytes() >= self._max_unread:
            return "this client has not read the replies already sent to it"
        if self.inflight_bytes and self.inflight_bytes + nbytes > self._max_inflight:   # one alone always fits
            return "too many request bytes in progress"
        account.pending += 1
        self.inflight_bytes += nbytes
        return None

    def answered(self, peer: bytes, nbytes: int) -> None:
        """The request counted by ``admit`` has its reply (or was dropped)."""
        account = self._peers.get(peer)
        if account is not None:
            account.pending = max(0, account.pending - 1)
        self.inflight_bytes = max(0, self.inflight_bytes - nbytes)

    def may_send(self, peer: bytes) -> bool:
        """False when the peer's unread replies are over the byte cap (the next one is dropped)."""
        account = self._peers.get(peer)
        return account is None or account.unread_bytes() < self._max_unread

    def sent(self, peer: bytes, tracker: zmq.MessageTracker, nbytes: int) -> None:
        """A large reply handed to libzmq; it counts until ``tracker`` says libzmq released it."""
        self._peers.setdefault(peer, _Peer()).unread.append((tracker, nbytes))

    def sweep(self) -> None:
        """Forget the peers that owe nothing (identities of clients come and go)."""
        for peer in [p for p, a in self._peers.items() if a.pending == 0 and a.unread_bytes() == 0]:
            del self._peers[peer]

    def peers(self) -> int:
        return len(self._peers)
