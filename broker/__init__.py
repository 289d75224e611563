"""Redis-backed asyncio WebSocket message broker."""

__version__ = "0.1.0"
