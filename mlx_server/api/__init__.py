"""Thin aiohttp handlers: parse -> manager/engine -> serialize."""
