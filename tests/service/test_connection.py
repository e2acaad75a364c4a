"""The API's asyncio Redis client packs commands with hiredis: the same bytes as redis-py's own packer."""

import asyncio

import hiredis
import pytest
import redis
from redis.asyncio.connection import Connection

from hoppatch.connection import connect_async

ARGUMENTS = [
    ("SET", "k", "value"),
    ("CONFIG GET", "maxmemory"),  # a command name with a literal argument in it
    (b"CLIENT SETNAME", b"api"),
    ("EVALSHA", "0" * 40, 2, "a", "b", b"\x00\xff\x10", 3, -7, 1.5, 0.1, 1e-7, 10**20, "é"),
    ("HSET", "h", "f", memoryview(b"view"), "g", bytearray(b"array")),
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=lambda a: str(a[0]))
def test_packed_commands_are_byte_for_byte_what_redis_py_packs(redis_url, args):
    client = connect_async(redis_url)
    ours = client.connection_pool.connection_class()
    assert b"".join(ours.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_a_value_redis_cannot_store_is_refused_as_redis_py_refuses_it(redis_url):
    ours = connect_async(redis_url).connection_pool.connection_class()
    with pytest.raises(redis.DataError):
        Connection().pack_command("SET", "k", True)
    with pytest.raises(redis.DataError):
        ours.pack_command("SET", "k", True)


def test_binary_and_numeric_values_round_trip_through_redis(redis_url, redis_client):
    async def round_trip():
        client = connect_async(redis_url)
        try:
            await client.hset("hoppatch:test:packing", mapping={"bytes": b"\x00\xff", "int": 12, "float": 0.25, "text": "é"})
            return await client.hgetall("hoppatch:test:packing")
        finally:
            await client.aclose()

    assert asyncio.run(round_trip()) == {b"bytes": b"\x00\xff", b"int": b"12", b"float": b"0.25", b"text": "é".encode()}


def test_the_api_client_packs_through_hiredis(redis_url, redis_client, monkeypatch):
    packed = []
    real = hiredis.pack_command
    monkeypatch.setattr(hiredis, "pack_command", lambda args: packed.append(args[0]) or real(args))

    async def ping():
        client = connect_async(redis_url)
        try:
            return await client.set("hoppatch:test:packed", "1")
        finally:
            await client.aclose()

    assert asyncio.run(ping())
    assert b"SET" in packed or "SET" in packed
