"""qemu-vnet client: the `vnet-client` command and a Python library for VM managers.

    from vnet_client import Client

The names are imported on first use, so that the short-lived commands (`vnet-client`,
`vnet-bridge-helper`, which QEMU runs for every `-netdev bridge`, `vnet-ifup`/`vnet-ifdown`) do
not pay for dbus-fast and asyncio: they use the synchronous client, `vnet_client.blocking`
(jeepney).
"""

__all__ = ["Attachment", "Client", "VnetClientError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vnet_client' has no attribute {name!r}")
