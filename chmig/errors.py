"""The one exception hierarchy of chmig.

Every error carries *what* failed (the message) and *where* (``where``: a
protocol step, a URL, a file, an ioctl).  The CLI prints ``str(error)`` as one
line and exits non-zero, so messages are written to stand alone.

    ChmigError
    ├── UsageError          bad command line, API request or option value
    ├── KvmError            a KVM ioctl or vCPU exit went wrong
    ├── VmError             the VM is in the wrong state or cannot be built
    │   └── NoVmError       no VM to show, no config to boot (API: 404, Cloud Hypervisor's VmNotCreated)
    ├── UffdError           userfaultfd registration or resolution failed
    ├── StuckThreadError    a thread did not stop by its deadline (reported, never left silently)
    ├── InternalError       a bug in chmig itself — never blamed on the peer
    └── MigrationError      anything on the migration path
        ├── ProtocolError   the peer broke the wire protocol (bad header, bad state)
        ├── TransportError  a socket, URL, TLS or fd-passing failure
        │   ├── ListenerAborted  the owner stopped a listener that was waiting in accept
        │   └── PeerSilent       the peer sent nothing for longer than it may
        ├── PeerError       the peer answered Error
        ├── PostcopyError   postcopy failed after the hand-over (the source holds the missing pages)
        └── ConvergenceError  precopy did not converge and the strategy is cancel
"""

from __future__ import annotations


class ChmigError(Exception):
    """Base of every error chmig raises on purpose."""

    #: A message longer than this is cut: errors are one line, whatever a peer sent.
    MAX_MESSAGE = 1000

    def __init__(self, message: str, *, where: str | None = None) -> None:
        if len(message) > self.MAX_MESSAGE:
            message = f"{message[: self.MAX_MESSAGE]}… ({len(message) - self.MAX_MESSAGE} more characters)"
        if where is not None and len(where) > 200:
            where = where[:200] + "…"
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UsageError(ChmigError):
    """A command line, API request or option value is wrong."""


class KvmError(ChmigError):
    """A KVM ioctl failed or a vCPU exited in a way the VMM cannot handle."""


class VmError(ChmigError):
    """The VM cannot do what was asked in its current state, or cannot be built."""


class NoVmError(VmError):
    """The VMM has no VM: none was created, restored or received yet, or it was deleted."""


class UffdError(ChmigError):
    """userfaultfd could not be set up or a fault could not be resolved."""


class StuckThreadError(ChmigError):
    """Threads that were told to stop were still running at their deadline."""


class InternalError(ChmigError):
    """Something inside chmig failed that no input should cause: a bug, reported as ours."""


class MigrationError(ChmigError):
    """A migration failed."""


class PostcopyError(MigrationError):
    """Postcopy failed after the hand-over: the pages not yet pulled exist only on the source."""


class ProtocolError(MigrationError):
    """The peer sent something the protocol does not allow."""


class TransportError(MigrationError):
    """A connection, URL, TLS handshake or fd transfer failed."""


class ListenerAborted(TransportError):
    """``accept`` returned because the listener's owner aborted it (not an error of any peer)."""


class PeerSilent(TransportError):
    """The peer said nothing for longer than the protocol step allows."""


class PeerError(MigrationError):
    """The peer answered a request with an Error response."""


class ConvergenceError(MigrationError):
    """Precopy did not converge in time and the timeout strategy is ``cancel``."""
