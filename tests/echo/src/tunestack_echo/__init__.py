"""The ``echo`` test-double method, installed through an entry point like any third-party plugin."""

from tunestack.testing.probe import CALLS, Echo, EchoOptions, tunestack_register_methods

__all__ = ["CALLS", "Echo", "EchoOptions", "tunestack_register_methods"]
