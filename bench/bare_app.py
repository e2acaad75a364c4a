"""The bare stack hoppatch's submit path is measured against: one Litestar handler that decodes the job body
with msgspec and writes one Redis MULTI (HSET + RPUSH), on the same uvicorn, Redis, body and connections.

    BARE_REDIS_URL=redis://… uvicorn bench.bare_app:app --http httptools --loop uvloop
"""

from __future__ import annotations

import os
import uuid

import msgspec
import redis.asyncio as aioredis
from litestar import Litestar, Response, post

from hoppatch.spec import JobSpec

_redis = aioredis.Redis.from_url(os.environ.get("BARE_REDIS_URL", "redis://127.0.0.1:6379/0"))


@post("/v1/jobs", status_code=202)
async def create_job(data: JobSpec) -> Response[dict[str, str]]:
    job_id = uuid.uuid4().hex
    async with _redis.pipeline(transaction=True) as pipe:
        pipe.hset(f"bare:job:{job_id}", mapping={"spec": msgspec.json.encode(data)})
        pipe.rpush("bare:queue", job_id)
        await pipe.execute()
    return Response({"id": job_id}, status_code=202)


app = Litestar([create_job])
