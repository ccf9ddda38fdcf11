"""Sinks: where publications go. Today one: Centrifugo's GRPC server API."""
