"""Broker adapters: NATS JetStream, RabbitMQ and the embedded nats-server.

Empty until the messaging work lands.
"""
