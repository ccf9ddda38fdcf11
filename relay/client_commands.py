"""`relay tail` and `relay publish`: small clients of any Centrifugo GRPC API (or the embedded one)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from typing import NoReturn

import grpc

from relay.errors import FatalError
from relay.proto.centrifugo import api_pb2 as v6
from relay.proto.centrifugo import api_pb2_grpc as v6_grpc
from relay.proto.centrifugo_v2 import api_pb2 as v2
from relay.proto.centrifugo_v2 import api_pb2_grpc as v2_grpc
from relay.secrets import load_secret
from relay.sinks.grpc_centrifugo import STATUS_TO_CODE, auth_metadata, open_channel
from relay.units import parse_duration


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return auth_metadata(load_secret(env=args.api_key_env))


def _fail(what: str, err: grpc.aio.AioRpcError) -> NoReturn:
    code = STATUS_TO_CODE.get(err.code())
    detail = f"error {code}: {err.details()}" if code else f"{err.code().name}: {err.details()}"
    raise FatalError(f"{what}: {detail}")


async def publish(args: argparse.Namespace) -> None:
    """Publish once; print the result as JSON (offset and epoch where the server keeps history)."""
    data = args.data.encode()
    async with open_channel(args.address) as channel:
        try:
            if args.api == "v2":
                resp2 = await v2_grpc.CentrifugoStub(channel).Publish(  # type: ignore[no-untyped-call]
                    v2.PublishRequest(channel=args.channel, data=data), metadata=_metadata(args), timeout=10)
                if resp2.error.code:
                    raise FatalError(f"publish: error {resp2.error.code}: {resp2.error.message}")
                print(json.dumps({"channel": args.channel}))
                return
            resp = await v6_grpc.CentrifugoApiStub(channel).Publish(  # type: ignore[no-untyped-call]
                v6.PublishRequest(channel=args.channel, data=data), metadata=_metadata(args), timeout=10)
        except grpc.aio.AioRpcError as err:
            _fail("publish", err)
    if resp.error.code:
        raise FatalError(f"publish: error {resp.error.code}: {resp.error.message}")
    print(json.dumps({"channel": args.channel, "offset": resp.result.offset, "epoch": resp.result.epoch}))


def _line(pub: v6.Publication, channel: str) -> str:
    try:
        data: object = json.loads(pub.data)
        key = "data"
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to print as JSON
        data, key = base64.b64encode(pub.data).decode(), "data_base64"
    entry: dict[str, object] = {"channel": channel, "offset": pub.offset, key: data}
    if pub.tags:
        entry["tags"] = dict(pub.tags)
    return json.dumps(entry, ensure_ascii=False)


async def tail(args: argparse.Namespace) -> None:
    """Follow a channel through History with `since`: one JSON line per publication."""
    poll = parse_duration(args.poll)
    metadata = _metadata(args)
    async with open_channel(args.address) as channel:
        stub = v6_grpc.CentrifugoApiStub(channel)  # type: ignore[no-untyped-call]

        async def history(**kw: object) -> v6.HistoryResult:
            resp = await stub.History(v6.HistoryRequest(channel=args.channel, **kw),  # type: ignore[arg-type]
                                      metadata=metadata, timeout=10)
            if resp.error.code:
                raise FatalError(f"tail {args.channel}: error {resp.error.code}: {resp.error.message}")
            result: v6.HistoryResult = resp.result
            return result

        since: v6.StreamPosition | None = None
        while True:
            try:
                if since is None:
                    top = await history(limit=-1 if args.from_start else 0)
                    for pub in top.publications:
                        print(_line(pub, args.channel), flush=True)
                    since = v6.StreamPosition(offset=top.offset, epoch=top.epoch)
                else:
                    result = await history(limit=-1, since=since)
                    if result.epoch != since.epoch:
                        print(f"relay tail: stream of {args.channel} was reset (epoch changed)",
                              file=sys.stderr)
                    for pub in result.publications:
                        print(_line(pub, args.channel), flush=True)
                    since = v6.StreamPosition(offset=result.offset, epoch=result.epoch)
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    await asyncio.sleep(1)  # the server restarts; keep following
                    continue
                _fail(f"tail {args.channel}", err)
            except FatalError as err:
                if "error 112" in str(err):  # position no longer retained: start again from the top
                    print(f"relay tail: {err}; continuing from the newest", file=sys.stderr)
                    since = None
                    continue
                raise
            await asyncio.sleep(poll)


