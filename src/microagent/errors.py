"""The one exception tree of microagent, and the exit codes it maps to.

Every error a user can see is a :class:`MicroagentError`: it carries a message, a hint
(what to do about it, may be empty) and the exit code the CLI returns. Foreign errors
(``OSError``, ``subprocess``, HTTP) are translated at the boundary with ``raise ... from``.
The CLI turns these into text or ``--json`` in one place::

    MicroagentError                 exit 1   "error"
    ├── UsageError                  exit 2   "usage"        bad names, references, flags
    │                                                       (also a ValueError)
    ├── NotFoundError               exit 1   "not-found"    unknown image, workspace, blob
    ├── ConflictError               exit 1   "conflict"     exists already, wrong state
    │   └── PausedError             exit 1   "conflict"     the VM is paused (also for exec)
    ├── RetryableError              exit 75  "retryable"
    │   ├── BusyError               exit 75  "busy"         a lock is held by another command
    │   ├── UnreachableError        exit 75  "unreachable"  registry down, network failure
    │   ├── WaitTimeoutError        exit 75  "timed-out"    wait: the state did not come
    │   └── ConsoleTimeoutError     exit 75  "timed-out"    connect --send
    ├── RegistryError               exit 1   "registry"     the registry answered wrongly
    │   └── AuthError               exit 1   "auth"         credentials refused
    ├── IntegrityError              exit 1   "integrity"    digest mismatch, corrupt layer
    ├── UnsafeImageError            exit 1   "unsafe-image" a layer entry escapes the tree
    ├── DiskTooSmallError           exit 1   "disk-too-small"
    ├── HostError                   exit 1   "host"         a host tool or file system failed
    ├── UnresponsiveError           exit 1   "unresponsive" the guest or supervisor did not answer
    ├── StartError                  exit 1   "start-failed" a boot failed (the console's tail)
    ├── SetupFailedError            exit N   "setup-failed" a --setup command's code
    ├── CommandFailedError          exit N   "command-failed" the API's check=True: the result
    ├── UnsafeCopyError             exit 1   "unsafe-path"  cp: a path escapes
    ├── BrokenWorkspaceError        exit 1   "broken"       a workspace.json that cannot be read
    ├── AgentFileError              exit 1   "guest-file"   a file operation the agent refused
    ├── ProtocolError               exit 1   "protocol"     a malformed frame
    └── QmpError                    exit 1   "vmm"          QEMU's monitor failed

Signals are not errors: Ctrl-C is Python's ``KeyboardInterrupt`` and the CLI turns SIGTERM
into :class:`Terminated`, a ``KeyboardInterrupt`` too, so that the same cleanup runs;
the exit code is 128 + the signal's number (:func:`interrupted_exit_code`).
``exec`` and ``run`` return 125 for every error but a usage error and PausedError
(CLI.md); :class:`Terminated` also ends an exec whose guest did not act on a forwarded
signal in time, with its own message.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: `import microagent` stays light
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_RETRYABLE = 75
EXIT_EXEC_FAILED = 125  # exec and run: microagent itself failed, not the command
EXIT_TIMED_OUT = 124  # exec and run: the command's --timeout ended it
EXIT_CANNOT_EXECUTE = 126  # the command could not be executed
EXIT_NOT_FOUND = 127  # the command was not found


class MicroagentError(Exception):
    """Base of every error microagent reports to a user."""

    exit_code = EXIT_FAILURE
    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_json(self) -> dict[str, str]:
        """The ``{"kind", "message", "hint"}`` shape used by ``--json``."""
        return {"kind": self.kind, "message": self.message, "hint": self.hint}


class UsageError(MicroagentError, ValueError):
    """The command line or an argument is malformed; nothing was done. Also a
    ``ValueError``, as a Python caller expects of a bad argument."""

    exit_code = EXIT_USAGE
    kind = "usage"


class NotFoundError(MicroagentError):
    """A named thing (image, workspace, blob, kernel) does not exist."""

    kind = "not-found"


class CommandNotFoundError(NotFoundError):
    """A command to start in the background is not in the guest (``ws.spawn``,
    ``exec -d``): the CLI exits 127, as ``exec`` of it does."""

    exit_code = EXIT_NOT_FOUND


class ConflictError(MicroagentError):
    """The thing exists already, or is in a state that refuses the verb."""

    kind = "conflict"


class PausedError(ConflictError):
    """The workspace's VM is paused (e.g. its host disk is full): exec, cp and console
    input wait for ``resume``. Exit 1 also for exec and run (CLI.md, "Memory state")."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"workspace {name} is paused: {reason}; resume it first",
                         hint=f"microagent resume {name}")
        self.reason = reason


class RetryableError(MicroagentError):
    """The same command may succeed later."""

    exit_code = EXIT_RETRYABLE
    kind = "retryable"


class BusyError(RetryableError):
    """Another command holds the lock this one needs."""

    kind = "busy"


class UnreachableError(RetryableError):
    """A server could not be reached (connection refused, DNS, timeouts)."""

    kind = "unreachable"


class RegistryError(MicroagentError):
    """A registry answered, but not with what the distribution API promises."""

    kind = "registry"


class AuthError(RegistryError):
    """A registry refused the credentials (or the lack of them)."""

    kind = "auth"


class IntegrityError(MicroagentError):
    """Content does not match its digest, or a layer is truncated or corrupt."""

    kind = "integrity"


class UnsafeImageError(MicroagentError):
    """A layer entry would write outside the root tree; the image is refused."""

    kind = "unsafe-image"


class DiskTooSmallError(MicroagentError):
    """The requested disk size cannot hold the image."""

    kind = "disk-too-small"


class HostError(MicroagentError):
    """A host tool or the host file system failed."""

    kind = "host"


class UnresponsiveError(MicroagentError):
    """A bounded wait for the guest or the supervisor passed without an answer (a frozen
    or hung VM, a stopped process)."""

    kind = "unresponsive"


class WaitTimeoutError(RetryableError):
    """``wait`` gave up before the workspace reached the state it waited for."""

    kind = "timed-out"


class ConsoleTimeoutError(RetryableError):
    """``--send`` saw no end of its command in time; the command was interrupted."""

    kind = "timed-out"


class StartError(MicroagentError):
    """A boot that failed; the message carries the console's last lines."""

    kind = "start-failed"


class SetupFailedError(MicroagentError):
    """A setup command exited non-zero; the CLI exits with the command's code."""

    kind = "setup-failed"

    def __init__(self, message: str, exit_code: int, hint: str = "") -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code if 0 < exit_code < 256 else 1


class CommandFailedError(MicroagentError):
    """A command run with ``check=True`` (or ``ExecResult.check()``) did not exit 0.
    ``result`` is its :class:`microagent.ExecResult`; the exit code is the command's."""

    kind = "command-failed"

    def __init__(self, message: str, result: Any, exit_code: int) -> None:
        super().__init__(message)
        self.result = result
        self.exit_code = exit_code if 0 < exit_code < 256 else 1


class UnsafeCopyError(MicroagentError):
    """A copied entry would make the host write outside the destination; refused."""

    kind = "unsafe-path"


class BrokenWorkspaceError(MicroagentError):
    """The workspace's record cannot be read (truncated, not JSON, fields missing).

    ``workspace`` is what ``list`` and ``status`` show for it (the state's record type):
    state ``broken``, the reason in ``error``.
    """

    kind = "broken"

    def __init__(self, name: str, error: str, workspace: Any = None) -> None:
        super().__init__(f"workspace {name} is broken: {error}",
                         hint=f"delete it (microagent delete {name}), or restore "
                              "its workspace.json")
        self.workspace = workspace


class AgentFileError(MicroagentError):
    """The guest agent refused a file operation: ``code`` is its errno name (ENOENT...)."""

    kind = "guest-file"

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


class CommandNotExecutableError(AgentFileError):
    """A command to start in the background cannot be executed (``EACCES``, ``ENOEXEC``):
    the CLI exits 126, as ``exec`` of it does."""

    exit_code = EXIT_CANNOT_EXECUTE


class ProtocolError(MicroagentError):
    """The peer sent something the protocol does not allow."""

    kind = "protocol"


class QmpError(MicroagentError):
    """QEMU's monitor refused a command or went away."""

    kind = "vmm"


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another terminating signal) raised in the main thread as Ctrl-C's
    KeyboardInterrupt is, so that every cleanup that Ctrl-C runs runs too."""

    def __init__(self, signum: int = 15, message: str = "") -> None:  # SIGTERM
        import signal

        super().__init__(message or signal.Signals(signum).name)
        self.signum = int(signum)
        self.message = message  # what to say instead of "terminated"


def interrupted_exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else 2)  # SIGINT
