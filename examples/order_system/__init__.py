"""The order example: an order's events and the read side that answers GET /orders/{id}."""
