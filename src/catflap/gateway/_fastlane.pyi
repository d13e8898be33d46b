# Type stub for the C extension _fastlane.c (see fastlane.py).

CLOSE_FRAME: int
WRITE_BLOCKED: int
EOF: int
RECALLED: int
STOPPED: int
FAILED: int
CONTROL_FRAME: int
FRAME_HEADER_MAX_BYTES: int
CONTROL_FRAME_MAX_PAYLOAD_BYTES: int

_LegState = tuple[int, bytes]
# skip, partial, frames, bytes, to_feed, to_write, dropped, cut
_LegReturn = tuple[int, bytes, int, int, bytes, bytes, int, bool]

class Lane:
    def __init__(self) -> None: ...
    @property
    def active(self) -> int: ...
    @property
    def thread_id(self) -> int: ...
    def enter(
        self, client_fd: int, agent_fd: int, client_state: _LegState, agent_state: _LegState
    ) -> int: ...
    def recall(self, handle: int, /) -> None: ...
    def counters(self, handle: int, /) -> tuple[int, int, int, int]: ...
    def take(self) -> list[tuple[int, int, _LegReturn, _LegReturn]]: ...
    def fileno(self) -> int: ...
    def stop(self) -> None: ...

def scan(state: _LegState, data: bytes, /) -> tuple[int, int, bytes, int]: ...
def _fail_allocations(count: int, /, skip: int = 0) -> None:
    """For tests only: after ``skip`` more allocations succeed, the next ``count`` fail."""
