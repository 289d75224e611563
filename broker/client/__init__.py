"""The Python client: publish with confirm, consume as an async iterator, reconnect with jittered backoff.

It stands alone: it imports nothing from the server side but the wire's error table (``broker.core.errors``, stdlib
only), so ``pip install redis-ws-broker`` (without the ``server`` extra) is enough to use it.
"""

from broker.client.client import BrokerClient, Message, Published, Subscription, error_from_frame

__all__ = ["BrokerClient", "Message", "Published", "Subscription", "error_from_frame"]
