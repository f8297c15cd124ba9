"""The choreographed order saga: ``python examples/order_system/choreography.py``.

The services live in ``seamwork.demo.choreography`` so that ``seamwork demo`` can run
them from an installed package; this runs the three-order example.
"""

import asyncio

from seamwork.demo.choreography import main

if __name__ == "__main__":
    asyncio.run(main())
