"""Broker adapters (NATS JetStream, RabbitMQ, embedded nats-server). Empty until the messaging work lands."""
