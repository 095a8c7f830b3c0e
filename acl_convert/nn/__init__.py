"""The Analytic Convolutional Layer and the per-kernel record it is built from."""

from .acl import ACL, channel_rows
from .assignment import Assignment

__all__ = ["ACL", "Assignment", "channel_rows"]
