"""What ``redis.replicas_to_ack = 1`` costs a publish on a Redis Cluster, at the store (no WebSockets): the latency
of ``publish_many`` for batches of 1 and of 100 messages over 30 topics (so every master), with 0 and 1 interleaved
in 10 rounds of 50 batches, and this process's CPU per message. Unlike most of ``bench`` this imports the broker
(the store is what it measures). docs/scaling.md has the numbers.

    scripts/redis-cluster.sh start && .venv/bin/python -m bench.waitcost redis://127.0.0.1:7100
"""

import asyncio
import sys
import time
import uuid

from broker.core.config import Settings
from broker.core.model import PublishRequest
from broker.runtime.resilience import Breaker
from broker.store import RedisStore, connect_redis

URL = sys.argv[1]


async def main():
    stores = {}
    for ack in (0, 1):
        s = Settings().replace(
            "redis", url=URL, cluster=True, replicas_to_ack=ack, key_prefix=f"wc{uuid.uuid4().hex[:6]}"
        )
        breaker = Breaker("redis", fail_max=5, reset_timeout_s=60.0)
        stores[ack] = RedisStore(connect_redis(URL, s), s, breaker, f"waitcost-{ack}")
    lat = {(a, n): [] for a in (0, 1) for n in (1, 100)}
    cpu = {(a, n): 0.0 for a in (0, 1) for n in (1, 100)}
    for rnd in range(10):
        for n in (1, 100):
            for ack in (0, 1) if rnd % 2 == 0 else (1, 0):
                st = stores[ack]
                c0 = time.process_time()
                for i in range(50):
                    reqs = [PublishRequest(f"t{(i * 7 + j) % 30}", '"x"') for j in range(n)]
                    t0 = time.perf_counter()
                    res = await st.publish_many(reqs)
                    lat[(ack, n)].append((time.perf_counter() - t0) * 1000)
                    assert all(not isinstance(r, Exception) for r in res), res[:1]
                cpu[(ack, n)] += time.process_time() - c0
    for (ack, n), xs in sorted(lat.items()):
        xs.sort()
        p50, p99 = xs[len(xs) // 2], xs[int(len(xs) * 0.99) - 1]
        print(
            f"batch={n:3d} replicas_to_ack={ack}: batches={len(xs)} p50={p50:.2f} ms p99={p99:.2f} ms "
            f"client_cpu={cpu[(ack, n)] * 1e6 / (len(xs) * n):.0f} us/msg"
        )
    for st in stores.values():
        await st.close()


asyncio.run(main())
