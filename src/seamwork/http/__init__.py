"""HTTP adapters (gateway, service client). Empty until the gateway work lands."""
