"""centrifugo-relay: feeds Centrifugo channels from Kafka topics, tailed files and a ticker."""

__version__ = "0.1.0"
