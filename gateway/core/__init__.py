"""Decisions, pure: what an entry, an exit, a sensor change or a block does to the store.

This package imports only the standard library and itself (a test pins it): no pydantic, no MQTT, no
drivers, no aiosqlite. The writer (`gateway.store.writer`) calls its handlers inside one transaction; the
settings it decides with are built from the config outside it (`gateway.store.settings`).
"""
