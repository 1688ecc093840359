"""A Ctrl-C raised from inside gRPC's setup of the next future or streaming call, for a child
process to run before its calls: that moment is a few Python steps wide, too narrow to hit
with a signal from outside. It wraps a private gRPC function, in the child alone."""

# Ctrl-C raises KeyboardInterrupt in the child, whatever it inherited: a test run started in the
# background by a non-interactive shell (`make test &`) hands every process SIGINT ignored, and
# Python then installs no handler of its own, so the Ctrl-C under test did nothing.
CTRL_C = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
"""

# The same, the child saying "ctrl-c" on stdout as its handler runs: the test lets the call under
# test go on once the Ctrl-C has landed, not after a guess at how long a loaded machine takes.
CTRL_C_SAID = """
import signal
def _ctrl_c(signum, frame):
    print("ctrl-c", flush=True)
    signal.default_int_handler(signum, frame)
signal.signal(signal.SIGINT, _ctrl_c)
"""

PRELUDE = (
    CTRL_C
    + """
import grpc._channel

_setup = grpc._channel._run_channel_spin_thread

def _interrupted_setup(state):
    grpc._channel._run_channel_spin_thread = _setup
    signal.raise_signal(signal.SIGINT)
    _setup(state)

def interrupt_next_call_setup():
    grpc._channel._run_channel_spin_thread = _interrupted_setup
"""
)
