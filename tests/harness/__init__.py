"""Real components for the test suite, started by fixtures: the embedded server in a subprocess,
a real Kafka broker, a real Centrifugo. Build caches live outside the work tree (RELAY_CACHE)."""
