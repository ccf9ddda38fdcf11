"""centrifugo-relay: feeds Centrifugo channels from Kafka topics, tailed files and a ticker."""

import os as _os

__version__ = "0.1.0"

# gRPC's EventEngine client (its default since 1.6x) hands every call between its threads: the relay
# saw twice the context switches of gRPC's classic client and about 4% more CPU per record (issue 14,
# measured with perf stat beside it). gRPC reads GRPC_EXPERIMENTS once, when it is imported, so this is
# set before anything imports grpc; an operator's own setting wins. tests/test_grpc_experiments.py
# fails when an installed grpcio no longer knows the experiment.
_os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")
