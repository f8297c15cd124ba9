"""seamwork: the core microservices patterns as real, tested Python components.

Import from the area packages: ``seamwork.saga``, ``seamwork.resilience``,
``seamwork.storage``; errors live in ``seamwork.errors``. Importing seamwork starts
and connects nothing.
"""

from seamwork import errors
from seamwork.errors import SeamworkError

__version__ = "0.1.0"

__all__ = ["SeamworkError", "__version__", "errors"]
